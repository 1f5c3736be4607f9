//! pdudaemon's API on the pdu service, for the LAVA and labgrid devices of a lab that sit on
//! outlets beside dutgate's machines (docs/pdu.md, "pdudaemon clients").
//!
//! Two listeners speak what pdudaemon 1.1.1 speaks, each on its own address and off while
//! unset:
//!
//! - HTTP: `GET /power/control/{on,off,reboot}?hostname=PDU&port=PORT[&delay=S]`, answering
//!   200 `OK - accepted request` or 500 `Invalid request` (labgrid's `PDUDaemonDriver`,
//!   `pduclient --http`);
//! - TCP: one line `PDU PORT ACTION [DELAY]`, answered `ack` or `nack` (LAVA's `pduclient`).
//!
//! Unlike pdudaemon, an answer comes only once the port reads back the requested state (a
//! reboot: OFF verified for the whole delay, then ON read back), so `ack` means done.
//!
//! Only peers in `pdu.pdudaemon.networks` are answered, and only outlets that no dutgate
//! machine uses are switched: mars is asked, on every request, which outlets its machines
//! record (a machine's outlet is switched only by its lease holder, design.md §10). Reserved
//! ports stay refused as everywhere else. Every switch and every refusal goes to the audit
//! log with the actor `pdudaemon@<peer address>`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use dutgate_core::audit::{Actor, AuditLog};
use dutgate_core::lease::LeaseCheck;
use dutgate_pdu_driver::Switch;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::service::PduService;

/// pdudaemon's HTTP answer to a request it carried out.
pub const HTTP_OK: &str = "OK - accepted request\n";
/// pdudaemon's HTTP answer to every request it did not carry out (status 500).
pub const HTTP_INVALID: &str = "Invalid request\n";
/// pdudaemon's TCP answers.
pub const TCP_ACK: &str = "ack\n";
pub const TCP_NACK: &str = "nack\n";

/// Off delay of a reboot that names none: pdudaemon's default since its start.
pub const DEFAULT_REBOOT_DELAY: Duration = Duration::from_secs(5);

/// How long a TCP peer may take to send its line.
const TCP_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// pdudaemon reads one chunk of at most this many bytes.
const TCP_MAX_LINE: usize = 16384;
/// Requests handled at once per listener; more wait for a slot (each holds a port lock or
/// waits for mars, so a flood must not open unbounded work).
const MAX_CONCURRENT: usize = 64;

/// The `pdu.pdudaemon` section of the gateway config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTP listener (pdudaemon's port is 16421); unset: off.
    pub http_listen: Option<SocketAddr>,
    /// Address of the TCP listener (LAVA's `pduclient` connects to port 16421); unset: off.
    pub tcp_listen: Option<SocketAddr>,
    /// Peers answered (CIDR); everyone else is refused.
    pub networks: Vec<IpNet>,
    /// Longest `delay` a request may ask for, in seconds.
    pub max_delay_seconds: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_listen: None,
            tcp_listen: None,
            networks: Vec::new(),
            max_delay_seconds: 300,
        }
    }
}

/// Where the listeners listen (the bound addresses: a configured port 0 is resolved).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bound {
    pub http: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("pdu.pdudaemon.{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("pdu.pdudaemon.networks is empty: a pdudaemon listener would answer nobody")]
    NoNetworks,
    #[error(
        "pdu.pdudaemon.networks: {net} overlaps the DUT network {dut} (gateway.auth.dut_networks): \
         DUTs must not switch power"
    )]
    DutNetwork { net: IpNet, dut: IpNet },
}

fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// `Ok(())` when no machine mars knows is on `pdu` port `port`; an outlet that cannot be
/// checked (mars down, or no mars to ask) is treated as a machine's.
async fn check_free(leases: &LeaseCheck, pdu: &str, port: &str) -> Result<(), Refusal> {
    match leases.machine_on_port(pdu, port).await {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(Refusal::MachineOutlet {
            pdu: pdu.to_string(),
            port: port.to_string(),
        }),
        Err(e) => Err(Refusal::Unchecked(e.to_string())),
    }
}

/// What a pdudaemon client asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    On,
    Off,
    Reboot,
}

impl Action {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "on" => Some(Self::On),
            "off" => Some(Self::Off),
            "reboot" => Some(Self::Reboot),
            _ => None,
        }
    }

    fn audit_action(self) -> &'static str {
        match self {
            Self::On | Self::Off => "pdu.switch",
            Self::Reboot => "pdu.cycle",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::On => "on",
            Self::Off => "off",
            Self::Reboot => "reboot",
        })
    }
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub hostname: String,
    pub port: String,
    pub action: Action,
    /// pdudaemon's `delay`: seconds before an on/off, seconds off during a reboot. Negative
    /// values count as 0, as pdudaemon's `asyncio.sleep` does.
    pub delay: Option<u64>,
}

/// Why a request was not carried out: logged and audited; the client gets pdudaemon's
/// one-size answer (500 `Invalid request`, `nack`).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("peer {0} is not in pdu.pdudaemon.networks")]
    Peer(IpAddr),
    #[error("{0}")]
    Malformed(String),
    #[error("no PDU named {0:?}")]
    NoSuchPdu(String),
    #[error("delay {delay} s is longer than pdu.pdudaemon.max_delay_seconds ({max} s)")]
    Delay { delay: u64, max: u64 },
    #[error(
        "PDU {pdu:?} port {port:?} is a dutgate machine's outlet; only its lease holder switches it"
    )]
    MachineOutlet { pdu: String, port: String },
    #[error("cannot ask mars which outlets machines use: {0}")]
    Unchecked(String),
    #[error(transparent)]
    Power(#[from] crate::PowerError),
}

impl Refusal {
    /// A request that was allowed but could not be carried out (the device or mars failed),
    /// as opposed to one refused.
    fn is_failure(&self) -> bool {
        match self {
            Self::Unchecked(_) => true,
            Self::Power(e) => !matches!(
                e,
                crate::PowerError::NoSuchPort { .. } | crate::PowerError::Reserved { .. }
            ),
            _ => false,
        }
    }
}

/// pdudaemon's `int()` of a request field, with Python's message on failure (pdudaemon's TCP
/// listener sends that message as its answer).
fn python_int(s: &str) -> Result<i64, String> {
    let t = s.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid literal for int() with base 10: '{s}'"));
    }
    let negative = t.starts_with('-');
    // Python's ints are unbounded; larger ones saturate (any delay that long is refused).
    Ok(match digits.parse::<i64>() {
        Ok(v) if negative => -v,
        Ok(v) => v,
        Err(_) if negative => i64::MIN,
        Err(_) => i64::MAX,
    })
}

fn delay_seconds(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The TCP line: `hostname port action [delay]`, split on single spaces as pdudaemon does.
/// The error is the text pdudaemon answers with.
pub fn parse_tcp(data: &str) -> Result<Result<Request, Refusal>, String> {
    let fields: Vec<&str> = data.split(' ').collect();
    if !(3..=4).contains(&fields.len()) {
        return Err("Unexpected data".into());
    }
    let delay = match fields.get(3) {
        Some(d) => Some(delay_seconds(python_int(d)?)),
        None => None,
    };
    let port = python_int(fields[1])?;
    let Some(action) = Action::parse(fields[2]) else {
        return Ok(Err(Refusal::Malformed(format!(
            "unknown request {:?}",
            fields[2]
        ))));
    };
    if fields[0].is_empty() {
        return Ok(Err(Refusal::Malformed("hostname is empty".into())));
    }
    Ok(Ok(Request {
        hostname: fields[0].to_string(),
        port: port.to_string(),
        action,
        delay,
    }))
}

/// The HTTP query of `/power/control/{action}`; a key given twice counts once (the first), a
/// blank value as unset, as Python's `parse_qs` reads them.
pub fn parse_http(action: Action, query: &[(String, String)]) -> Result<Request, Refusal> {
    let first = |key: &str| {
        query
            .iter()
            .find(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.as_str())
    };
    if first("alias").is_some() {
        return Err(Refusal::Malformed(
            "aliases are not supported: name the PDU in hostname and the port in port".into(),
        ));
    }
    let (Some(hostname), Some(port)) = (first("hostname"), first("port")) else {
        return Err(Refusal::Malformed(
            "one of hostname, port was not set".into(),
        ));
    };
    let delay = match first("delay") {
        Some(d) => Some(delay_seconds(python_int(d).map_err(Refusal::Malformed)?)),
        None => None,
    };
    Ok(Request {
        hostname: hostname.to_string(),
        port: port.to_string(),
        action,
        delay,
    })
}

/// What both listeners share.
struct Shared {
    svc: PduService,
    /// Asks mars which outlets machines use.
    outlets: LeaseCheck,
    audit: Option<AuditLog>,
    networks: Vec<IpNet>,
    max_delay: u64,
    slots: tokio::sync::Semaphore,
}

impl Shared {
    fn admitted(&self, peer: IpAddr) -> bool {
        let ip = peer.to_canonical();
        self.networks.iter().any(|n| n.contains(&ip))
    }

    async fn audit(&self, actor: &Actor, action: &str, target: &str, outcome: &str) {
        dutgate_core::audit::record_or_trace(self.audit.as_ref(), actor, action, target, outcome)
            .await;
    }

    /// Records a request refused before it named anything to switch.
    async fn refused_early(&self, peer: SocketAddr, listener: &str, why: &Refusal) {
        tracing::warn!(peer = %peer, listener, reason = %why, "pdudaemon request refused");
        self.audit(
            &actor(peer),
            "pdu.pdudaemon",
            &format!("pdudaemon/{listener}"),
            &format!("refused: {why}"),
        )
        .await;
    }

    /// Carries out `req` for `peer`, audited either way.
    async fn execute(&self, peer: SocketAddr, req: &Request) -> Result<(), Refusal> {
        let _slot = self.slots.acquire().await;
        let r = self.execute_inner(req).await;
        let port = match &r {
            Ok(port) | Err((_, port)) => port.as_str(),
        };
        let target = format!("pdu/{}/port/{port}", req.hostname);
        let outcome = match &r {
            Ok(_) => match req.action {
                Action::Reboot => format!(
                    "ok: reboot, off {} s, read back ON",
                    req.delay.unwrap_or(DEFAULT_REBOOT_DELAY.as_secs())
                ),
                a => format!("ok: {a}, read back"),
            },
            Err((e, _)) if e.is_failure() => format!("failed: {e}"),
            Err((e, _)) => format!("refused: {e}"),
        };
        match &r {
            Ok(_) => tracing::info!(
                peer = %peer, pdu = %req.hostname, port, action = %req.action,
                "pdudaemon request done"
            ),
            Err((e, _)) => tracing::warn!(
                peer = %peer, pdu = %req.hostname, port, action = %req.action, reason = %e,
                "pdudaemon request not carried out"
            ),
        }
        self.audit(&actor(peer), req.action.audit_action(), &target, &outcome)
            .await;
        r.map(|_| ()).map_err(|(e, _)| e)
    }

    /// The port id switched, or the refusal with the port as asked.
    async fn execute_inner(&self, req: &Request) -> Result<String, (Refusal, String)> {
        let asked = req.port.clone();
        let fail = |e: Refusal| (e, asked.clone());
        let pdu = self
            .svc
            .get(&req.hostname)
            .await
            .ok_or_else(|| fail(Refusal::NoSuchPdu(req.hostname.clone())))?;
        let port = resolve_port(&pdu, &req.port).map_err(|e| fail(e.into()))?;
        let delay = req.delay.unwrap_or(match req.action {
            Action::Reboot => DEFAULT_REBOOT_DELAY.as_secs(),
            Action::On | Action::Off => 0,
        });
        if delay > self.max_delay {
            return Err(fail(Refusal::Delay {
                delay,
                max: self.max_delay,
            }));
        }
        let fail = |e: Refusal| (e, port.clone());
        check_free(&self.outlets, &req.hostname, &port)
            .await
            .map_err(fail)?;
        let delay = Duration::from_secs(delay);
        match req.action {
            Action::Reboot => {
                pdu.cycle(&port, delay).await.map_err(|e| fail(e.into()))?;
            }
            Action::On | Action::Off => {
                // pdudaemon waits `delay` before an on or off (a deprecated use it still
                // honours); the outlet is checked again afterwards, as it may have become a
                // machine's meanwhile.
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                    check_free(&self.outlets, &req.hostname, &port)
                        .await
                        .map_err(fail)?;
                }
                let want = if req.action == Action::On {
                    Switch::On
                } else {
                    Switch::Off
                };
                pdu.switch(&port, want).await.map_err(|e| fail(e.into()))?;
            }
        }
        Ok(port)
    }
}

fn actor(peer: SocketAddr) -> Actor {
    Actor {
        name: format!("pdudaemon@{}", peer.ip().to_canonical()),
        role: None,
        source: peer.to_string(),
    }
}

/// The dutgate port id a pdudaemon port names: the id itself, else the number it spells
/// (pdudaemon's drivers take `04` as port 4).
fn resolve_port(pdu: &crate::pdu::Pdu, asked: &str) -> Result<String, crate::PowerError> {
    match pdu.port(asked) {
        Ok(p) => Ok(p.id),
        Err(e) => match python_int(asked) {
            Ok(n) if n.to_string() != asked => pdu.port(&n.to_string()).map(|p| p.id),
            _ => Err(e),
        },
    }
}

/// Binds the configured listeners and serves them until `shutdown`. `dut_networks`: the
/// gateway's DUT networks, which `networks` may not overlap (pdudaemon's API has no
/// credentials, and DUTs run arbitrary code).
pub async fn start(
    config: &Config,
    dut_networks: &[IpNet],
    svc: PduService,
    outlets: LeaseCheck,
    audit: Option<AuditLog>,
    shutdown: CancellationToken,
) -> Result<Bound, StartError> {
    if config.http_listen.is_none() && config.tcp_listen.is_none() {
        return Ok(Bound::default());
    }
    if config.networks.is_empty() {
        return Err(StartError::NoNetworks);
    }
    for net in &config.networks {
        if let Some(dut) = dut_networks.iter().find(|d| overlap(net, d)) {
            return Err(StartError::DutNetwork {
                net: *net,
                dut: *dut,
            });
        }
    }
    let bind = |key: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { key, addr, source })
    };
    let http = match config.http_listen {
        Some(a) => Some(bind("http_listen", a).await?),
        None => None,
    };
    let tcp = match config.tcp_listen {
        Some(a) => Some(bind("tcp_listen", a).await?),
        None => None,
    };
    let shared = Arc::new(Shared {
        svc,
        outlets,
        audit,
        networks: config.networks.clone(),
        max_delay: config.max_delay_seconds,
        slots: tokio::sync::Semaphore::new(MAX_CONCURRENT),
    });
    let mut bound = Bound::default();
    if let Some(l) = http {
        bound.http = l.local_addr().ok();
        tracing::info!(addr = ?bound.http, "pdudaemon HTTP listener");
        tokio::spawn(serve_http(l, shared.clone(), shutdown.clone()));
    }
    if let Some(l) = tcp {
        bound.tcp = l.local_addr().ok();
        tracing::info!(addr = ?bound.tcp, "pdudaemon TCP listener");
        tokio::spawn(serve_tcp(l, shared, shutdown.clone()));
    }
    Ok(bound)
}

// ---- HTTP ---------------------------------------------------------------------------------

async fn serve_http(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/power/control/{action}", get(http_request))
        .with_state(shared);
    let stop = shutdown.clone();
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { stop.cancelled().await });
    // A reboot with a long delay is not waited for at shutdown.
    tokio::select! {
        r = server => if let Err(e) = r {
            tracing::error!(error = %e, "pdudaemon HTTP listener failed");
        },
        _ = async { shutdown.cancelled().await; tokio::time::sleep(Duration::from_secs(1)).await } => {}
    }
}

fn invalid(status: StatusCode) -> Response {
    (status, HTTP_INVALID).into_response()
}

async fn http_request(
    State(s): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(action): Path<String>,
    query: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if !s.admitted(peer.ip()) {
        s.refused_early(peer, "http", &Refusal::Peer(peer.ip().to_canonical()))
            .await;
        return invalid(StatusCode::FORBIDDEN);
    }
    // pdudaemon routes only these three paths; anything else is aiohttp's 404.
    let Some(action) = Action::parse(&action) else {
        return (StatusCode::NOT_FOUND, "404: Not Found").into_response();
    };
    let req = match query {
        Ok(Query(q)) => parse_http(action, &q),
        Err(e) => Err(Refusal::Malformed(e.body_text())),
    };
    let req = match req {
        Ok(r) => r,
        Err(e) => {
            s.refused_early(peer, "http", &e).await;
            return invalid(StatusCode::INTERNAL_SERVER_ERROR);
        }
    };
    match s.execute(peer, &req).await {
        Ok(()) => (StatusCode::OK, HTTP_OK).into_response(),
        Err(_) => invalid(StatusCode::INTERNAL_SERVER_ERROR),
    }
}

// ---- TCP ----------------------------------------------------------------------------------

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                let stop = shutdown.clone();
                conns.spawn(async move {
                    tokio::select! {
                        _ = tcp_connection(stream, peer, &shared) => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                tracing::warn!(error = %e, "pdudaemon TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    conns.close();
}

async fn tcp_connection(mut stream: TcpStream, peer: SocketAddr, s: &Shared) {
    let answer = tcp_answer(&mut stream, peer, s).await;
    if let Some(answer) = answer {
        let _ = tokio::time::timeout(TCP_READ_TIMEOUT, stream.write_all(answer.as_bytes())).await;
    }
    let _ = stream.shutdown().await;
}

/// The answer to one connection (`None`: the peer sent nothing in time).
async fn tcp_answer(stream: &mut TcpStream, peer: SocketAddr, s: &Shared) -> Option<String> {
    if !s.admitted(peer.ip()) {
        s.refused_early(peer, "tcp", &Refusal::Peer(peer.ip().to_canonical()))
            .await;
        return Some(TCP_NACK.into());
    }
    // pdudaemon reads one chunk: pduclient sends its line in one write and no newline, then
    // waits for the answer without closing its side.
    let mut buf = vec![0u8; TCP_MAX_LINE];
    let n = match tokio::time::timeout(TCP_READ_TIMEOUT, stream.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => n,
        _ => return None,
    };
    let Ok(text) = std::str::from_utf8(&buf[..n]) else {
        let e = Refusal::Malformed("the request is not UTF-8".into());
        s.refused_early(peer, "tcp", &e).await;
        return Some("'utf-8' codec can't decode the request: invalid data".into());
    };
    let req = match parse_tcp(text.trim()) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            s.refused_early(peer, "tcp", &e).await;
            return Some(TCP_NACK.into());
        }
        Err(pdudaemon_text) => {
            s.refused_early(peer, "tcp", &Refusal::Malformed(pdudaemon_text.clone()))
                .await;
            return Some(pdudaemon_text);
        }
    };
    Some(match s.execute(peer, &req).await {
        Ok(()) => TCP_ACK.into(),
        Err(_) => TCP_NACK.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_lines_as_pdudaemon_reads_them() {
        let r = parse_tcp("rack 04 reboot 3").unwrap().unwrap();
        assert_eq!(
            r,
            Request {
                hostname: "rack".into(),
                port: "4".into(),
                action: Action::Reboot,
                delay: Some(3),
            }
        );
        assert_eq!(parse_tcp("rack 1 on").unwrap().unwrap().delay, None);
        assert_eq!(parse_tcp("rack 1").unwrap_err(), "Unexpected data");
        assert_eq!(parse_tcp("rack 1 on 2 3").unwrap_err(), "Unexpected data");
        // Two spaces make an empty field, as Python's split(" ") does: four fields, the
        // fourth read as the delay first.
        assert_eq!(
            parse_tcp("rack  1 on").unwrap_err(),
            "invalid literal for int() with base 10: 'on'"
        );
        assert_eq!(
            parse_tcp("rack  on").unwrap_err(),
            "invalid literal for int() with base 10: ''"
        );
        assert_eq!(
            parse_tcp("rack x on").unwrap_err(),
            "invalid literal for int() with base 10: 'x'"
        );
        assert!(matches!(
            parse_tcp(" 1 on").unwrap(),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            parse_tcp("rack 1 toggle").unwrap(),
            Err(Refusal::Malformed(_))
        ));
        assert_eq!(parse_tcp("rack 1 on -4").unwrap().unwrap().delay, Some(0));
    }

    #[test]
    fn http_queries_as_parse_qs_reads_them() {
        let q = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let r = parse_http(
            Action::On,
            &q(&[("hostname", "rack"), ("port", "2"), ("port", "3")]),
        )
        .unwrap();
        assert_eq!((r.hostname.as_str(), r.port.as_str()), ("rack", "2"));
        assert!(parse_http(Action::On, &q(&[("hostname", "rack"), ("port", "")])).is_err());
        assert!(parse_http(Action::On, &q(&[("alias", "a")])).is_err());
        assert!(
            parse_http(
                Action::Reboot,
                &q(&[("hostname", "r"), ("port", "1"), ("delay", "1.5")])
            )
            .is_err()
        );
        let r = parse_http(
            Action::Reboot,
            &q(&[("hostname", "r"), ("port", "1"), ("delay", " 7 ")]),
        )
        .unwrap();
        assert_eq!(r.delay, Some(7));
    }

    #[test]
    fn overlapping_networks() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        assert!(overlap(&n("10.0.0.0/8"), &n("10.42.0.0/16")));
        assert!(overlap(&n("10.42.1.0/24"), &n("10.42.0.0/16")));
        assert!(!overlap(&n("10.43.0.0/16"), &n("10.42.0.0/16")));
        assert!(!overlap(&n("::1/128"), &n("127.0.0.0/8")));
    }

    #[test]
    fn python_ints() {
        assert_eq!(python_int("+5"), Ok(5));
        assert_eq!(python_int("-3"), Ok(-3));
        assert!(python_int("").is_err());
        assert!(python_int("0x1").is_err());
        assert_eq!(python_int("99999999999999999999999"), Ok(i64::MAX));
    }
}
