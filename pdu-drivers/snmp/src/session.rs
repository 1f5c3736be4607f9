//! One long-lived SNMP session per PDU, with a timeout on every request (snmp2 has none).

use std::time::Duration;

use dutgate_pdu_driver::DriverError;
use snmp2::{AsyncSession, v3};

use crate::model::Oid;
use crate::{AuthProtocol, Config, PrivProtocol, Version};

/// A varbind value, owned.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Str(String),
    /// noSuchObject / noSuchInstance (or v1 noSuchName).
    Missing,
    Other(String),
}

impl Value {
    fn from_snmp(v: &snmp2::Value<'_>) -> Value {
        match v {
            snmp2::Value::Integer(i) => Value::Int(*i),
            snmp2::Value::Unsigned32(i)
            | snmp2::Value::Counter32(i)
            | snmp2::Value::Timeticks(i) => Value::Int(i64::from(*i)),
            snmp2::Value::OctetString(s) => Value::Str(String::from_utf8_lossy(s).into_owned()),
            snmp2::Value::NoSuchObject | snmp2::Value::NoSuchInstance => Value::Missing,
            other => Value::Other(format!("{other:?}")),
        }
    }
}

/// RFC 3416 error-status names, for messages an operator can act on.
fn error_status_name(status: u32) -> &'static str {
    match status {
        1 => "tooBig",
        2 => "noSuchName",
        3 => "badValue",
        4 => "readOnly",
        5 => "genErr",
        6 => "noAccess (read-only community or user?)",
        7 => "wrongType",
        8 => "wrongLength",
        9 => "wrongEncoding",
        10 => "wrongValue",
        11 => "noCreation",
        12 => "inconsistentValue",
        13 => "resourceUnavailable",
        14 => "commitFailed",
        15 => "undoFailed",
        16 => "authorizationError",
        17 => "notWritable",
        18 => "inconsistentName",
        _ => "unknown error",
    }
}

pub struct Session {
    target: String,
    version: Version,
    community: Vec<u8>,
    security: Option<v3::Security>,
    timeout: Duration,
    max_repetitions: u32,
    inner: Option<Box<AsyncSession>>,
    req_id: i32,
}

enum Op<'a> {
    Get(&'a Oid),
    Next(&'a Oid),
    Bulk(&'a Oid, u32),
    Set(&'a Oid, i64),
}

impl Op<'_> {
    fn name(&self) -> &'static str {
        match self {
            Op::Get(_) => "GET",
            Op::Next(_) => "GETNEXT",
            Op::Bulk(..) => "GETBULK",
            Op::Set(..) => "SET",
        }
    }
    fn oid(&self) -> &Oid {
        match self {
            Op::Get(o) | Op::Next(o) | Op::Bulk(o, _) | Op::Set(o, _) => o,
        }
    }
}

fn to_snmp_oid(oid: &Oid) -> Result<snmp2::Oid<'static>, DriverError> {
    snmp2::Oid::from(&oid.0).map_err(|e| DriverError::Local(format!("OID {oid}: {e:?}")))
}

impl Session {
    pub fn new(cfg: &Config) -> Self {
        let security = cfg.v3.as_ref().map(|v| {
            let auth_protocol = match v.auth_protocol {
                AuthProtocol::Md5 => v3::AuthProtocol::Md5,
                AuthProtocol::Sha1 => v3::AuthProtocol::Sha1,
                AuthProtocol::Sha224 => v3::AuthProtocol::Sha224,
                AuthProtocol::Sha256 => v3::AuthProtocol::Sha256,
                AuthProtocol::Sha384 => v3::AuthProtocol::Sha384,
                AuthProtocol::Sha512 => v3::AuthProtocol::Sha512,
            };
            let auth = match (&v.auth_password, &v.priv_protocol, &v.priv_password) {
                (None, _, _) => v3::Auth::NoAuthNoPriv,
                (Some(_), Some(p), Some(pw)) => v3::Auth::AuthPriv {
                    cipher: match p {
                        PrivProtocol::Des => v3::Cipher::Des,
                        PrivProtocol::Aes128 => v3::Cipher::Aes128,
                        PrivProtocol::Aes192 => v3::Cipher::Aes192,
                        PrivProtocol::Aes256 => v3::Cipher::Aes256,
                    },
                    privacy_password: pw.as_bytes().to_vec(),
                },
                (Some(_), _, _) => v3::Auth::AuthNoPriv,
            };
            v3::Security::new(
                v.user.as_bytes(),
                v.auth_password.as_deref().unwrap_or_default().as_bytes(),
            )
            .with_auth_protocol(auth_protocol)
            .with_auth(auth)
        });
        Self {
            target: format!("SNMP agent {}:{}", cfg.host, cfg.port),
            version: cfg.version,
            community: cfg.community.as_bytes().to_vec(),
            security,
            timeout: Duration::from_millis(cfg.timeout_ms),
            max_repetitions: cfg.max_repetitions,
            inner: None,
            req_id: 1,
        }
        .with_host(&cfg.host, cfg.port)
    }

    fn with_host(mut self, host: &str, port: u16) -> Self {
        // Kept for connect(); IPv6 literals need brackets in "host:port".
        self.target = if host.contains(':') {
            format!("SNMP agent [{host}]:{port}")
        } else {
            format!("SNMP agent {host}:{port}")
        };
        self
    }

    pub fn target(&self) -> &str {
        &self.target
    }

    fn addr(&self) -> &str {
        self.target.trim_start_matches("SNMP agent ")
    }

    pub fn close(&mut self) {
        self.inner = None;
    }

    fn hint(&self) -> &'static str {
        match self.version {
            // Agents drop requests with an unknown community without answering.
            Version::V1 | Version::V2c => " (agent down, or wrong community?)",
            Version::V3 => " (agent down, or wrong user/credentials?)",
        }
    }

    async fn connect(&mut self) -> Result<(), DriverError> {
        if self.inner.is_some() {
            return Ok(());
        }
        let addr = self.addr().to_string();
        // A new session starts at a fresh request id so that a reply to the old session's
        // last request can never match.
        self.req_id = self.req_id.wrapping_add(10_000).max(1);
        let fut = async {
            let mut s = match self.version {
                Version::V1 => {
                    AsyncSession::new_v1(addr.as_str(), &self.community, self.req_id).await
                }
                Version::V2c => {
                    AsyncSession::new_v2c(addr.as_str(), &self.community, self.req_id).await
                }
                Version::V3 => match self.security.clone() {
                    Some(sec) => AsyncSession::new_v3(addr.as_str(), self.req_id, sec).await,
                    None => Err(std::io::Error::other("version v3 without a v3 section")),
                },
            }
            .map_err(|e| DriverError::unreachable(&self.target, e))?;
            if self.version == Version::V3 {
                s.init().await.map_err(|e| match e {
                    snmp2::Error::Receive => {
                        DriverError::unreachable(&self.target, "nothing answers on that port")
                    }
                    e => {
                        DriverError::refused(&self.target, format!("SNMPv3 engine discovery: {e}"))
                    }
                })?;
            }
            Ok::<_, DriverError>(Box::new(s))
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(s)) => {
                self.inner = Some(s);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DriverError::timeout(
                format!("{}: session set-up{}", self.target, self.hint()),
                self.timeout,
            )),
        }
    }

    /// One request with its timeout; v3 re-synchronisation (AuthUpdated) is retried once.
    async fn request(&mut self, op: Op<'_>) -> Result<Vec<(Vec<u64>, Value)>, DriverError> {
        let mut resynced = false;
        loop {
            self.connect().await?;
            let oid = to_snmp_oid(op.oid())?;
            let Some(sess) = self.inner.as_mut() else {
                return Err(DriverError::Local("SNMP session vanished".into()));
            };
            let fut = async {
                let pdu = match &op {
                    Op::Get(_) => sess.get(&oid).await,
                    Op::Next(_) => sess.getnext(&oid).await,
                    Op::Bulk(_, n) => sess.getbulk(&[&oid], 0, *n).await,
                    Op::Set(_, v) => sess.set(&[(&oid, snmp2::Value::Integer(*v))]).await,
                }?;
                let status = pdu.error_status;
                let rows: Vec<(Vec<u64>, Value)> = pdu
                    .varbinds
                    .map(|(name, value)| {
                        let comps: Vec<u64> = name.iter().map(|i| i.collect()).unwrap_or_default();
                        (comps, Value::from_snmp(&value))
                    })
                    .collect();
                Ok::<_, snmp2::Error>((status, rows))
            };
            let result = tokio::time::timeout(self.timeout, fut).await;
            let what = format!("{}: {} {}", self.target, op.name(), op.oid());
            match result {
                Err(_) => {
                    // The reply may still arrive; a new session will not mistake it.
                    self.inner = None;
                    return Err(DriverError::timeout(
                        format!("{what}{}", self.hint()),
                        self.timeout,
                    ));
                }
                Ok(Err(snmp2::Error::AuthUpdated)) if !resynced => {
                    resynced = true;
                    continue;
                }
                Ok(Err(e)) => {
                    self.inner = None;
                    return Err(match e {
                        snmp2::Error::Receive | snmp2::Error::Send => DriverError::unreachable(
                            &self.target,
                            format!(
                                "{} {}: nothing answers on that port (ICMP refused)",
                                op.name(),
                                op.oid()
                            ),
                        ),
                        snmp2::Error::AuthFailure(k) => DriverError::refused(
                            &self.target,
                            format!("SNMPv3 authentication failed: {k}"),
                        ),
                        e => DriverError::protocol(&self.target, format!("{what}: {e}")),
                    });
                }
                Ok(Ok((0, rows))) => return Ok(rows),
                Ok(Ok((2, _))) if !matches!(op, Op::Set(..)) => {
                    // v1 noSuchName on a read.
                    return Ok(vec![(op.oid().0.clone(), Value::Missing)]);
                }
                Ok(Ok((status, _))) => {
                    return Err(DriverError::refused(
                        &self.target,
                        format!("{} {}: {}", op.name(), op.oid(), error_status_name(status)),
                    ));
                }
            }
        }
    }

    pub async fn get(&mut self, oid: &Oid) -> Result<Value, DriverError> {
        let rows = self.request(Op::Get(oid)).await?;
        Ok(rows
            .into_iter()
            .next()
            .map(|(_, v)| v)
            .unwrap_or(Value::Missing))
    }

    pub async fn set_int(&mut self, oid: &Oid, value: i64) -> Result<(), DriverError> {
        self.request(Op::Set(oid, value)).await.map(|_| ())
    }

    /// Walks the table under `base`; returns (last OID component, value) of each row.
    pub async fn walk(&mut self, base: &Oid) -> Result<Vec<(u64, Value)>, DriverError> {
        let mut out = Vec::new();
        let mut cursor = base.clone();
        loop {
            let op = match self.version {
                Version::V1 => Op::Next(&cursor),
                Version::V2c | Version::V3 => Op::Bulk(&cursor, self.max_repetitions),
            };
            let rows = self.request(op).await?;
            let mut advanced = false;
            for (oid, value) in rows {
                if value == Value::Missing
                    || matches!(&value, Value::Other(s) if s.contains("END OF MIB"))
                    || !base.is_prefix_of(&oid)
                {
                    return Ok(out);
                }
                if oid <= cursor.0 {
                    return Err(DriverError::protocol(
                        &self.target,
                        format!("walk of {base} went backwards at {}", Oid(oid)),
                    ));
                }
                // Rows of a table are `<base>.<index>`; deeper rows (a sub-table) are skipped.
                if oid.len() == base.0.len() + 1 {
                    out.push((oid[base.0.len()], value));
                }
                cursor = Oid(oid);
                advanced = true;
                if out.len() > 4096 {
                    return Err(DriverError::protocol(
                        &self.target,
                        format!("table {base} has more than 4096 rows"),
                    ));
                }
            }
            if !advanced {
                return Ok(out);
            }
        }
    }
}
