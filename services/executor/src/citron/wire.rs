//! ci-tron's console protocol, version 1 (its client's `message.py`): each frame is a 4-byte
//! big-endian length and a JSON object `{"msg_type", "date", "payload"}`.
//!
//! - `ctrl`: `{"msg", "severity", "tag", "metadata"}`, what the executor says is happening;
//!   `tag` is one of ci-tron's `ControlMessageTag` ids ([`tag`]), which never change.
//! - `job_io`: console bytes, either way (DUT output to the client, keystrokes to the DUT), as
//!   Python's `base64.b85encode` text (RFC 1924's alphabet, the last group's padding cut).
//! - `session_end`: `{"status", "joules_consumed", "job_bucket"?}`, the last frame.

use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The protocol's name in `Upgrade:`.
pub const PROTOCOL: &str = "ci-tron-console";
/// The version announced in `Ci_tron_version:`.
pub const VERSION: &str = "1";
/// Largest frame accepted from a client: keystrokes are small.
pub const MAX_CLIENT_FRAME: usize = 64 * 1024;
/// Console bytes per `job_io` frame.
pub const IO_CHUNK: usize = 16 * 1024;

/// ci-tron's `ControlMessageTag` ids.
pub mod tag {
    pub const NO_TAG: u16 = 0;
    pub const JOB_INFRA_SETUP_START: u16 = 100;
    pub const JOB_INFRA_SETUP_COMPLETE: u16 = 101;
    pub const JOB_INFRA_SETUP_ERROR: u16 = 102;
    pub const JOB_INFRA_TEARDOWN_START: u16 = 105;
    pub const JOB_INFRA_TEARDOWN_COMPLETE: u16 = 106;
    pub const PDU_PORT_POWER_CYCLING_START: u16 = 200;
    pub const PDU_PORT_POWER_CYCLING_COMPLETE: u16 = 201;
    pub const DUT_POWER_SEQUENCE_DETECTED: u16 = 300;
    pub const TIMEOUT_HIT: u16 = 400;
    pub const DUT_CONSOLE_PATTERN_MATCHED: u16 = 401;
}

/// ci-tron's `LogLevel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info = 1,
    Warn = 2,
    Error = 3,
}

/// One frame, as sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Ctrl {
        msg: String,
        severity: Severity,
        tag: u16,
        metadata: Value,
    },
    JobIo(Vec<u8>),
    SessionEnd {
        status: dutgate_core::JobStatus,
        job_bucket: Option<JobBucket>,
    },
}

/// `session_end`'s `job_bucket`: where the client mirrors the job's files from.
#[derive(Debug, Clone, PartialEq)]
pub struct JobBucket {
    /// `http://ACCESS:SECRET@host:port`, as `MC_HOST_<alias>` wants it.
    pub minio_access_url: String,
    pub bucket_name: String,
}

impl Frame {
    pub fn ctrl(msg: impl Into<String>, tag: u16) -> Self {
        Frame::Ctrl {
            msg: msg.into(),
            severity: Severity::Info,
            tag,
            metadata: json!({}),
        }
    }

    fn json(&self, date: OffsetDateTime) -> Value {
        let (msg_type, payload) = match self {
            Frame::Ctrl {
                msg,
                severity,
                tag,
                metadata,
            } => (
                "ctrl",
                json!({"msg": msg, "severity": *severity as u8, "tag": tag, "metadata": metadata}),
            ),
            Frame::JobIo(bytes) => ("job_io", Value::String(b85encode(bytes))),
            Frame::SessionEnd { status, job_bucket } => {
                let mut p = json!({"status": status.as_str(), "joules_consumed": null});
                if let Some(b) = job_bucket {
                    p["job_bucket"] = json!({
                        "minio_access_url": b.minio_access_url,
                        "bucket_name": b.bucket_name,
                    });
                }
                ("session_end", p)
            }
        };
        json!({"msg_type": msg_type, "date": iso_date(date), "payload": payload})
    }

    /// The frame on the wire: length, then JSON.
    pub fn encode(&self, date: OffsetDateTime) -> Vec<u8> {
        let body = self.json(date).to_string().into_bytes();
        let mut out = Vec::with_capacity(4 + body.len());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }
}

/// Python's `datetime.isoformat()` of an aware UTC time, which `datetime.fromisoformat`
/// reads back on every Python the client supports (`Z` needs 3.11).
fn iso_date(d: OffsetDateTime) -> String {
    let d = d.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        d.year(),
        u8::from(d.month()),
        d.day(),
        d.hour(),
        d.minute(),
        d.second(),
        d.microsecond()
    )
}

/// What a client sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// Keystrokes for the DUT.
    Input(Vec<u8>),
    /// Another message type: nothing for the executor to do.
    Other(String),
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("the client closed the connection")]
    Closed,
    #[error("reading from the client: {0}")]
    Io(#[from] std::io::Error),
    #[error("a client frame of {0} bytes (at most {MAX_CLIENT_FRAME})")]
    TooLarge(usize),
    #[error("a client frame that is not ci-tron's JSON: {0}")]
    Json(String),
    #[error("a job_io payload that is not base85: {0}")]
    Base85(&'static str),
}

/// Reads the client's next frame. Clean EOF before a frame starts is [`WireError::Closed`].
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Incoming, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_CLIENT_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    // A frame cut short is a client that went away mid-write.
    tokio::time::timeout(Duration::from_secs(30), r.read_exact(&mut body))
        .await
        .map_err(|_| WireError::Closed)??;
    let v: Value = serde_json::from_slice(&body).map_err(|e| WireError::Json(e.to_string()))?;
    match v.get("msg_type").and_then(Value::as_str) {
        Some("job_io") => {
            let text = v
                .get("payload")
                .and_then(Value::as_str)
                .ok_or(WireError::Json("job_io without a text payload".into()))?;
            Ok(Incoming::Input(b85decode(text)?))
        }
        Some(other) => Ok(Incoming::Other(other.to_string())),
        None => Err(WireError::Json("no msg_type".into())),
    }
}

/// RFC 1924's alphabet, as Python's `base64.b85encode` uses it.
const B85: &[u8; 85] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&()*+-;<=>?@^_`{|}~";

/// Python's `base64.b85encode(data)` (no padding kept).
pub fn b85encode(data: &[u8]) -> String {
    let mut out = Vec::with_capacity(data.len().div_ceil(4) * 5);
    for chunk in data.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        let mut n = u32::from_be_bytes(word);
        let mut group = [0u8; 5];
        for slot in group.iter_mut().rev() {
            *slot = B85[(n % 85) as usize];
            n /= 85;
        }
        // A short last chunk keeps as many characters as it has bytes, plus one.
        out.extend_from_slice(&group[..chunk.len() + 1]);
    }
    // Every byte comes from the ASCII alphabet above.
    String::from_utf8(out).unwrap_or_default()
}

/// Python's `base64.b85decode(text)`.
pub fn b85decode(text: &str) -> Result<Vec<u8>, WireError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() / 5 * 4 + 4);
    for chunk in bytes.chunks(5) {
        if chunk.len() == 1 {
            return Err(WireError::Base85("a lone trailing character"));
        }
        let mut n: u64 = 0;
        for i in 0..5 {
            // A short last group is padded with the last character of the alphabet.
            let c = chunk.get(i).copied().unwrap_or(b'~');
            let digit = B85
                .iter()
                .position(|&a| a == c)
                .ok_or(WireError::Base85("a character outside the alphabet"))?;
            n = n * 85 + digit as u64;
        }
        let n = u32::try_from(n).map_err(|_| WireError::Base85("a group above 2^32"))?;
        out.extend_from_slice(&n.to_be_bytes()[..chunk.len() - 1]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base85_matches_python() {
        // `base64.b85encode` of each input, from CPython 3.11.
        let cases: &[(&[u8], &str)] = &[
            (b"", ""),
            (b"a", "VE"),
            (b"hello", "Xk~0{Zv"),
            (b"\x00\x00\x00\x00", "00000"),
            (b"\xff\xff\xff\xff", "|NsC0"),
            (b"\r\n", "4GI"),
            (b"\x00\x01\x02\x03\x04\x05\x06", "009C61O)~"),
        ];
        for (raw, text) in cases {
            assert_eq!(b85encode(raw), *text, "{raw:?}");
            assert_eq!(b85decode(text).unwrap(), *raw, "{text}");
        }
        assert!(b85decode("\"\"").is_err());
        assert!(b85decode("~~~~~").is_err());
        assert!(b85decode("abcde1").is_err());
    }

    proptest::proptest! {
        #[test]
        fn base85_round_trips(data in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            proptest::prop_assert_eq!(b85decode(&b85encode(&data)).unwrap(), data);
        }
    }

    #[test]
    fn frames_as_the_client_reads_them() {
        let date = time::macros::datetime!(2024-05-06 07:08:09.123456 UTC);
        let f = Frame::JobIo(b"hello".to_vec()).encode(date);
        let len = u32::from_be_bytes([f[0], f[1], f[2], f[3]]) as usize;
        assert_eq!(len, f.len() - 4);
        let v: Value = serde_json::from_slice(&f[4..]).unwrap();
        assert_eq!(
            v,
            json!({"msg_type": "job_io", "date": "2024-05-06T07:08:09.123456+00:00",
                   "payload": "Xk~0{Zv"})
        );
        let end = Frame::SessionEnd {
            status: dutgate_core::JobStatus::Fail,
            job_bucket: Some(JobBucket {
                minio_access_url: "http://a:b@h:1".into(),
                bucket_name: "job-1-client".into(),
            }),
        }
        .encode(date);
        let v: Value = serde_json::from_slice(&end[4..]).unwrap();
        assert_eq!(v["payload"]["status"], "FAIL");
        assert_eq!(v["payload"]["job_bucket"]["bucket_name"], "job-1-client");
        let ctrl = Frame::ctrl("+0.000s: hi", tag::TIMEOUT_HIT).encode(date);
        let v: Value = serde_json::from_slice(&ctrl[4..]).unwrap();
        assert_eq!(
            v["payload"],
            json!({"msg": "+0.000s: hi", "severity": 1, "tag": 400, "metadata": {}})
        );
    }

    #[tokio::test]
    async fn client_frames() {
        let body =
            json!({"msg_type": "job_io", "date": "x", "payload": b85encode(b"ls\n")}).to_string();
        let mut wire = (body.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(body.as_bytes());
        let mut r = &wire[..];
        assert_eq!(
            read_frame(&mut r).await.unwrap(),
            Incoming::Input(b"ls\n".to_vec())
        );
        assert!(matches!(read_frame(&mut r).await, Err(WireError::Closed)));
        let mut huge = &(u32::MAX.to_be_bytes())[..];
        assert!(matches!(
            read_frame(&mut huge).await,
            Err(WireError::TooLarge(_))
        ));
    }
}
