//! The outbound policy: where a fetch made on someone else's behalf (a boot artifact named in
//! a job's boot config; later webhooks, client connect-backs, job URLs) may go.
//!
//! A job author chooses such URLs, so without a policy the gateway fetches whatever they point
//! at: its own admin APIs on loopback, cloud metadata (169.254.169.254), HTTP-switched PDUs on
//! the lab network, other DUTs. The rules:
//!
//! - only `http` and `https`;
//! - the address the connection is actually made to must be outside loopback, link-local,
//!   unspecified, multicast/broadcast, private ranges (RFC 1918, CGNAT 100.64/10, ULA
//!   fc00::/7, IPv4-mapped/-compatible/NAT64 forms of all these) and the DUT networks, unless
//!   an admin allows it in `gateway.outbound.allow` (a network or address, optionally with a
//!   port: `10.0.0.0/8`, `127.0.0.1:41234`, `[fd00::/8]:443`);
//! - every hop is checked: literal-IP URLs before the request, names in the DNS resolver
//!   (refused addresses are dropped, so the connection can only go to allowed ones, whatever
//!   a rebinding DNS server answers the second time), redirects in the redirect policy, and
//!   finally the peer address of every new connection (exact address and port);
//! - no proxy from the environment (`HTTP_PROXY` would make the proxy, not the policy, decide
//!   where the request goes);
//! - timeouts on connect and on the whole request; callers bound the body size themselves
//!   with [`read_capped`] or their own streaming loop (the boot cache streams to disk).
//!
//! Every refusal is a [`Refusal`] whose text names the address, the rule and the config key,
//! and is logged with `tracing::warn!` where it is decided.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ipnet::IpNet;
use reqwest::Url;
use serde::{Deserialize, Serialize};

use crate::config::GatewayConfig;

/// The config key admins use to let outbound fetches reach internal addresses.
pub const ALLOW_KEY: &str = "gateway.outbound.allow";

/// Why an address is internal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    Loopback,
    Unspecified,
    /// 169.254/16 and fe80::/10: cloud metadata services live here.
    LinkLocal,
    Multicast,
    Broadcast,
    /// RFC 1918: 10/8, 172.16/12, 192.168/16.
    Private,
    /// RFC 6598 carrier-grade NAT space, 100.64/10.
    SharedCgnat,
    /// fc00::/7 (and the deprecated site-local fec0::/10).
    UniqueLocal,
    /// 0/8, 240/4, 198.18/15 (benchmarking), 192.0.0/24 (protocol assignments).
    Reserved,
    /// One of `gateway.auth.dut_networks`.
    DutNetwork,
}

impl AddressClass {
    pub fn describe(self) -> &'static str {
        match self {
            AddressClass::Loopback => "a loopback address",
            AddressClass::Unspecified => "an unspecified address",
            AddressClass::LinkLocal => "a link-local address",
            AddressClass::Multicast => "a multicast address",
            AddressClass::Broadcast => "the broadcast address",
            AddressClass::Private => "a private (RFC 1918) address",
            AddressClass::SharedCgnat => "a shared (CGNAT, 100.64.0.0/10) address",
            AddressClass::UniqueLocal => "a unique local (fc00::/7) address",
            AddressClass::Reserved => "a reserved address",
            AddressClass::DutNetwork => "in a DUT network (gateway.auth.dut_networks)",
        }
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some(AddressClass::Loopback)
    } else if ip.is_unspecified() {
        Some(AddressClass::Unspecified)
    } else if ip.is_link_local() {
        Some(AddressClass::LinkLocal)
    } else if ip.is_multicast() {
        Some(AddressClass::Multicast)
    } else if ip.is_broadcast() {
        Some(AddressClass::Broadcast)
    } else if ip.is_private() {
        Some(AddressClass::Private)
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some(AddressClass::SharedCgnat)
    } else if o[0] == 0
        || o[0] >= 240
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
    {
        Some(AddressClass::Reserved)
    } else {
        None
    }
}

/// The IPv4 address an IPv6 address stands for, where the kernel or a NAT64 gateway would
/// route it to that IPv4 address: mapped (`::ffff:a.b.c.d`), compatible (`::a.b.c.d`) and
/// the well-known NAT64 prefix (`64:ff9b::a.b.c.d`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_loopback() && !ip.is_unspecified() {
        return Some(tail);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail);
    }
    None
}

fn classify_v6(ip: Ipv6Addr) -> Option<AddressClass> {
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    let first = ip.segments()[0];
    if ip.is_loopback() {
        Some(AddressClass::Loopback)
    } else if ip.is_unspecified() {
        Some(AddressClass::Unspecified)
    } else if ip.is_multicast() {
        Some(AddressClass::Multicast)
    } else if first & 0xffc0 == 0xfe80 {
        Some(AddressClass::LinkLocal)
    } else if first & 0xfe00 == 0xfc00 || first & 0xffc0 == 0xfec0 {
        Some(AddressClass::UniqueLocal)
    } else {
        None
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`, so networks and rules written in IPv4 match it.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Why `ip` is internal (`None`: a public address). The DUT networks count as internal.
pub fn classify(ip: IpAddr, dut_networks: &[IpNet]) -> Option<AddressClass> {
    let ip = canonical(ip);
    let class = match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    };
    class.or_else(|| {
        dut_networks
            .iter()
            .any(|n| n.contains(&ip))
            .then_some(AddressClass::DutNetwork)
    })
}

/// One entry of `gateway.outbound.allow`: a network (or one address) and optionally a port.
/// Written `10.0.0.0/8`, `192.168.1.5`, `127.0.0.1:41234`, `10.0.0.0/8:443`, `fd00::/8`,
/// `[fd00::1]:8080`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AllowRule {
    pub net: IpNet,
    pub port: Option<u16>,
}

impl AllowRule {
    /// Exactly one address and port (e.g. a server of the gateway's own).
    pub fn exact(addr: SocketAddr) -> Self {
        let ip = canonical(addr.ip());
        Self {
            net: IpNet::from(ip),
            port: Some(addr.port()),
        }
    }

    /// Whether the rule allows `ip`; with `port` unknown (DNS resolution), any port of the
    /// rule counts (the connection is checked again with its port).
    pub fn matches(&self, ip: IpAddr, port: Option<u16>) -> bool {
        self.net.contains(&canonical(ip))
            && match (self.port, port) {
                (Some(want), Some(got)) => want == got,
                _ => true,
            }
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let single = self.net.prefix_len() == self.net.max_prefix_len();
        let net = if single {
            self.net.addr().to_string()
        } else {
            self.net.to_string()
        };
        match (self.port, self.net) {
            (None, _) => f.write_str(&net),
            (Some(p), IpNet::V6(_)) => write!(f, "[{net}]:{p}"),
            (Some(p), IpNet::V4(_)) => write!(f, "{net}:{p}"),
        }
    }
}

impl From<AllowRule> for String {
    fn from(r: AllowRule) -> Self {
        r.to_string()
    }
}

impl TryFrom<String> for AllowRule {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl FromStr for AllowRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad = || {
            format!(
                "{s:?} is not a network or address with an optional port \
                 (10.0.0.0/8, 127.0.0.1:8080, [fd00::/8]:443)"
            )
        };
        let (net, port) = if let Some(rest) = s.strip_prefix('[') {
            let (inner, after) = rest.split_once(']').ok_or_else(bad)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(bad)?),
            };
            (inner, port)
        } else if s.matches(':').count() == 1 {
            let (net, port) = s.split_once(':').ok_or_else(bad)?;
            (net, Some(port))
        } else {
            (s, None)
        };
        let net: IpNet = match net.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => IpNet::from(net.parse::<IpAddr>().map_err(|_| bad())?),
        };
        let net = match net {
            IpNet::V6(v6) if v6.max_prefix_len() - v6.prefix_len() <= 32 => {
                match canonical(IpAddr::V6(v6.network())) {
                    IpAddr::V4(v4) => {
                        IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).map_err(|_| bad())?
                    }
                    IpAddr::V6(_) => net,
                }
            }
            n => n,
        };
        let port = match port {
            None => None,
            Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?),
        };
        Ok(Self {
            net: net.trunc(),
            port,
        })
    }
}

/// The `gateway.outbound` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundConfig {
    /// Internal destinations outbound fetches may reach anyway (an artifact server on the lab
    /// network, a local mirror): networks or addresses, each optionally with a port.
    pub allow: Vec<AllowRule>,
}

/// A refused fetch, phrased for the person who asked for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{url}: only http and https URLs are fetched, not {scheme}")]
    Scheme { url: String, scheme: String },
    #[error("{url}: {addr} is {}; outbound fetches may not reach it ({ALLOW_KEY})", .class.describe())]
    Address {
        url: String,
        addr: String,
        class: AddressClass,
    },
    #[error(
        "{url}: {host} resolves only to addresses outbound fetches may not reach: {detail} ({ALLOW_KEY})"
    )]
    Resolved {
        url: String,
        host: String,
        detail: String,
    },
    #[error("{url}: too many redirects")]
    TooManyRedirects { url: String },
    #[error("{url}: larger than the limit of {limit} bytes")]
    TooLarge { url: String, limit: u64 },
}

/// Most redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 10;

#[derive(Debug)]
struct Inner {
    allow: Vec<AllowRule>,
    dut_networks: Vec<IpNet>,
}

/// The policy, cheap to clone. Build the HTTP client with [`OutboundPolicy::client`].
#[derive(Debug, Clone)]
pub struct OutboundPolicy {
    inner: Arc<Inner>,
}

impl OutboundPolicy {
    pub fn new(allow: Vec<AllowRule>, dut_networks: Vec<IpNet>) -> Self {
        Self {
            inner: Arc::new(Inner {
                allow,
                dut_networks,
            }),
        }
    }

    /// `gateway.outbound.allow` and `gateway.auth.dut_networks`.
    pub fn from_gateway(gw: &GatewayConfig) -> Self {
        Self::new(gw.outbound.allow.clone(), gw.auth.dut_networks.clone())
    }

    /// Checks one destination. `port` is `None` when it is not known yet (DNS answers).
    pub fn check_ip(&self, ip: IpAddr, port: Option<u16>) -> Result<(), AddressClass> {
        match classify(ip, &self.inner.dut_networks) {
            None => Ok(()),
            Some(_) if self.inner.allow.iter().any(|r| r.matches(ip, port)) => Ok(()),
            Some(class) => Err(class),
        }
    }

    fn refuse(&self, url: &Url, addr: String, class: AddressClass) -> Refusal {
        Refusal::Address {
            url: redact(url),
            addr,
            class,
        }
    }

    /// What can be checked without the network: the scheme, and the address when the URL's
    /// host is a literal IP (such URLs never reach a resolver).
    pub fn check_url(&self, url: &Url) -> Result<(), Refusal> {
        let port = match url.scheme() {
            "http" | "https" => url.port_or_known_default(),
            other => {
                return Err(Refusal::Scheme {
                    url: redact(url),
                    scheme: other.to_string(),
                });
            }
        };
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        self.check_ip(ip, port)
            .map_err(|class| self.refuse(url, canonical(ip).to_string(), class))
    }

    /// [`check_url`](Self::check_url), and for a host name its current DNS answer: refused
    /// when every address it resolves to is refused (the fetch could not go anywhere else).
    /// A name that does not resolve now is not refused here; the fetch will tell. For an
    /// early, clear answer (e.g. when a boot config is stored); the fetch checks again.
    pub async fn check_url_resolved(&self, url: &Url, timeout: Duration) -> Result<(), Refusal> {
        self.check_url(url)?;
        let Some(url::Host::Domain(host)) = url.host() else {
            return Ok(());
        };
        let port = url.port_or_known_default().unwrap_or(80);
        let lookup = tokio::net::lookup_host((host.to_string(), port));
        let addrs: Vec<SocketAddr> = match tokio::time::timeout(timeout, lookup).await {
            Ok(Ok(a)) => a.collect(),
            _ => return Ok(()),
        };
        let mut refused = Vec::new();
        for a in &addrs {
            match self.check_ip(a.ip(), Some(port)) {
                Ok(()) => return Ok(()),
                Err(class) => {
                    refused.push(format!("{} is {}", canonical(a.ip()), class.describe()))
                }
            }
        }
        if refused.is_empty() {
            return Ok(());
        }
        Err(Refusal::Resolved {
            url: redact(url),
            host: host.to_string(),
            detail: refused.join(", "),
        })
    }

    /// A client that applies the policy to every hop: no environment proxy, a resolver that
    /// drops refused addresses, a redirect policy that checks each target, and a check of
    /// each new connection's peer address. `timeout` bounds each whole request (use
    /// `None` for long downloads that bound silence with `read_timeout` instead).
    pub fn client(
        &self,
        connect_timeout: Duration,
        timeout: Option<Duration>,
    ) -> reqwest::Result<reqwest::Client> {
        let mut b = self.client_builder().connect_timeout(connect_timeout);
        if let Some(t) = timeout {
            b = b.timeout(t);
        }
        b.build()
    }

    /// The builder behind [`client`](Self::client), for callers that set more options. Do
    /// not add a proxy or another resolver to it.
    pub fn client_builder(&self) -> reqwest::ClientBuilder {
        let redirects = self.clone();
        reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(PolicyResolver {
                policy: self.clone(),
            }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    let url = redact(attempt.url());
                    return attempt.error(Refusal::TooManyRedirects { url });
                }
                match redirects.check_url(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(e) => {
                        tracing::warn!(error = %e, "outbound redirect refused");
                        attempt.error(e)
                    }
                }
            }))
            .connector_layer(PeerCheckLayer {
                policy: self.clone(),
            })
    }

    /// Sends `req` after checking its URL (literal IPs do not go through the resolver).
    /// The refusal, if any, is logged.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, SendError> {
        let (client, req) = req.build_split();
        let req = req.map_err(SendError::Http)?;
        if let Err(e) = self.check_url(req.url()) {
            tracing::warn!(error = %e, "outbound fetch refused");
            return Err(SendError::Refused(e));
        }
        client.execute(req).await.map_err(|e| match refusal_in(&e) {
            Some(r) => {
                let r = with_url(r, e.url());
                tracing::warn!(error = %r, "outbound fetch refused");
                SendError::Refused(r)
            }
            None => SendError::Http(e),
        })
    }
}

/// Error of [`OutboundPolicy::send`].
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Refused(Refusal),
    #[error(transparent)]
    Http(reqwest::Error),
}

/// The policy's refusal inside a reqwest error (from the resolver, the redirect policy or the
/// connection check), if that is why the request failed.
pub fn refusal_in(err: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<Refusal>() {
            return Some(r.clone());
        }
        cur = e.source();
    }
    None
}

/// A refusal decided below the URL (the resolver sees a host name, the connection check a
/// socket address) names the URL of the request that failed, when known.
fn with_url(mut r: Refusal, failed: Option<&Url>) -> Refusal {
    if let (Some(u), Refusal::Resolved { url, .. } | Refusal::Address { url, .. }) =
        (failed, &mut r)
        && !url.contains("://")
    {
        *url = redact(u);
    }
    r
}

/// Reads a response body of at most `limit` bytes (for small fetches: webhook answers and
/// the like); larger bodies are refused without reading them all.
pub async fn read_capped(
    mut resp: reqwest::Response,
    limit: u64,
) -> Result<bytes::Bytes, SendError> {
    let url = redact(resp.url());
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(SendError::Refused(Refusal::TooLarge { url, limit }));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(SendError::Http)? {
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(SendError::Refused(Refusal::TooLarge { url, limit }));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.into())
}

/// The URL without user name, password, query or fragment (which may carry credentials),
/// for messages and logs.
pub fn redact(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// DNS resolution through the system resolver, keeping only addresses the policy allows (by
/// address: the port is checked when the connection is made).
struct PolicyResolver {
    policy: OutboundPolicy,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = Vec::new();
            let mut kept = Vec::new();
            for a in found {
                match policy.check_ip(a.ip(), None) {
                    Ok(()) => kept.push(a),
                    Err(class) => {
                        refused.push(format!("{} is {}", canonical(a.ip()), class.describe()))
                    }
                }
            }
            if kept.is_empty() && !refused.is_empty() {
                let e = Refusal::Resolved {
                    url: host.clone(),
                    host: host.clone(),
                    detail: refused.join(", "),
                };
                tracing::warn!(host = %host, error = %e, "outbound fetch refused by DNS answer");
                return Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
            }
            if !refused.is_empty() {
                tracing::warn!(host = %host, dropped = %refused.join(", "), "outbound fetch: dropped refused addresses from the DNS answer");
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Checks the peer address (with port) of every connection the client makes: the last word,
/// whatever the URL, the DNS or a redirect said.
#[derive(Clone)]
struct PeerCheckLayer {
    policy: OutboundPolicy,
}

impl<S> tower::Layer<S> for PeerCheckLayer {
    type Service = PeerCheck<S>;
    fn layer(&self, inner: S) -> PeerCheck<S> {
        PeerCheck {
            inner,
            policy: self.policy.clone(),
        }
    }
}

#[derive(Clone)]
struct PeerCheck<S> {
    inner: S,
    policy: OutboundPolicy,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, R> tower::Service<R> for PeerCheck<S>
where
    S: tower::Service<R, Error = BoxError>,
    S::Response: hyper_util::client::legacy::connect::Connection + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let fut = self.inner.call(req);
        let policy = self.policy.clone();
        Box::pin(async move {
            let conn = fut.await?;
            let mut ext = http::Extensions::new();
            hyper_util::client::legacy::connect::Connection::connected(&conn).get_extras(&mut ext);
            let Some(info) = ext.get::<hyper_util::client::legacy::connect::HttpInfo>() else {
                // Without the peer address nothing can be checked: fail closed.
                return Err("outbound connection without a known peer address".into());
            };
            let peer = info.remote_addr();
            if let Err(class) = policy.check_ip(peer.ip(), Some(peer.port())) {
                let e = Refusal::Address {
                    url: format!("connection to {peer}"),
                    addr: canonical(peer.ip()).to_string(),
                    class,
                };
                tracing::warn!(peer = %peer, error = %e, "outbound connection refused");
                return Err(Box::new(e) as BoxError);
            }
            Ok(conn)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifier() {
        let dut: Vec<IpNet> = vec!["192.0.2.0/24".parse().unwrap()];
        let cases = [
            ("127.0.0.1", Some(AddressClass::Loopback)),
            ("127.255.1.2", Some(AddressClass::Loopback)),
            ("::1", Some(AddressClass::Loopback)),
            ("::ffff:127.0.0.1", Some(AddressClass::Loopback)),
            ("::127.0.0.1", Some(AddressClass::Loopback)),
            ("64:ff9b::7f00:1", Some(AddressClass::Loopback)),
            ("0.0.0.0", Some(AddressClass::Unspecified)),
            ("::", Some(AddressClass::Unspecified)),
            ("169.254.169.254", Some(AddressClass::LinkLocal)),
            ("::ffff:169.254.169.254", Some(AddressClass::LinkLocal)),
            ("fe80::1", Some(AddressClass::LinkLocal)),
            ("224.0.0.1", Some(AddressClass::Multicast)),
            ("ff02::1", Some(AddressClass::Multicast)),
            ("255.255.255.255", Some(AddressClass::Broadcast)),
            ("10.1.2.3", Some(AddressClass::Private)),
            ("172.16.0.1", Some(AddressClass::Private)),
            ("172.31.255.255", Some(AddressClass::Private)),
            ("192.168.1.1", Some(AddressClass::Private)),
            ("::ffff:10.0.0.1", Some(AddressClass::Private)),
            ("100.64.0.1", Some(AddressClass::SharedCgnat)),
            ("100.127.255.255", Some(AddressClass::SharedCgnat)),
            ("fc00::1", Some(AddressClass::UniqueLocal)),
            ("fd12:3456::1", Some(AddressClass::UniqueLocal)),
            ("0.1.2.3", Some(AddressClass::Reserved)),
            ("240.0.0.1", Some(AddressClass::Reserved)),
            ("192.0.2.7", Some(AddressClass::DutNetwork)),
            ("::ffff:192.0.2.7", Some(AddressClass::DutNetwork)),
            ("8.8.8.8", None),
            ("172.32.0.1", None),
            ("100.128.0.1", None),
            ("100.63.255.255", None),
            ("2001:4860:4860::8888", None),
            ("::ffff:8.8.8.8", None),
        ];
        for (s, want) in cases {
            assert_eq!(classify(ip(s), &dut), want, "{s}");
        }
    }

    #[test]
    fn allow_rules_parse_and_match() {
        let r: AllowRule = "127.0.0.1:41234".parse().unwrap();
        assert!(r.matches(ip("127.0.0.1"), Some(41234)));
        assert!(r.matches(ip("::ffff:127.0.0.1"), Some(41234)));
        assert!(!r.matches(ip("127.0.0.1"), Some(8004)));
        assert!(r.matches(ip("127.0.0.1"), None));
        assert!(!r.matches(ip("127.0.0.2"), None));
        assert_eq!(r.to_string(), "127.0.0.1:41234");
        let r: AllowRule = "10.0.0.0/8".parse().unwrap();
        assert!(r.matches(ip("10.9.9.9"), Some(1)));
        assert_eq!(r.to_string(), "10.0.0.0/8");
        let r: AllowRule = "[fd00::/8]:443".parse().unwrap();
        assert!(r.matches(ip("fd01::1"), Some(443)));
        assert!(!r.matches(ip("fd01::1"), Some(80)));
        assert_eq!(r.to_string(), "[fd00::/8]:443");
        let r: AllowRule = "fd00::1".parse().unwrap();
        assert_eq!(r.to_string(), "fd00::1");
        let r: AllowRule = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(r.to_string(), "10.0.0.0/8");
        for bad in [
            "",
            "nope",
            "10.0.0.0/33",
            "1.2.3.4:0",
            "1.2.3.4:x",
            "[::1",
            "[::1]x",
        ] {
            assert!(bad.parse::<AllowRule>().is_err(), "{bad}");
        }
        let c: OutboundConfig =
            yaml_serde::from_str("allow: ['127.0.0.1:8080', 10.0.0.0/8]").unwrap();
        assert_eq!(c.allow.len(), 2);
        assert!(yaml_serde::from_str::<OutboundConfig>("allow: [bad]").is_err());
        assert!(yaml_serde::from_str::<OutboundConfig>("deny: []").is_err());
    }

    #[test]
    fn urls() {
        let p = OutboundPolicy::new(
            vec!["127.0.0.1:5000".parse().unwrap()],
            vec!["10.42.0.0/16".parse().unwrap()],
        );
        let check = |u: &str| p.check_url(&Url::parse(u).unwrap());
        assert!(check("http://127.0.0.1:5000/k").is_ok());
        assert!(check("https://example.org/k").is_ok());
        assert!(check("http://8.8.8.8/k").is_ok());
        let e = check("http://127.0.0.1:8004/k?secret=1").unwrap_err();
        assert_eq!(
            e.to_string(),
            "http://127.0.0.1:8004/k: 127.0.0.1 is a loopback address; outbound fetches may \
             not reach it (gateway.outbound.allow)"
        );
        // Numeric host spellings are IPv4 literals to the URL parser, so to the policy.
        for u in [
            "http://2130706433/",
            "http://0x7f.1/",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.42.1.1/",
            "http://[fd00::1]/",
        ] {
            assert!(
                matches!(check(u), Err(Refusal::Address { .. })),
                "{u}: {:?}",
                check(u)
            );
        }
        assert!(matches!(
            check("ftp://example.org/x"),
            Err(Refusal::Scheme { .. })
        ));
        assert!(matches!(
            check("file:///etc/passwd"),
            Err(Refusal::Scheme { .. })
        ));
        // Credentials in a URL never reach a message.
        let e = check("http://user:pw@127.0.0.1/").unwrap_err().to_string();
        assert!(!e.contains("pw"), "{e}");
    }

    /// Through a real client and server: the resolver drops refused addresses, and the
    /// connection check holds the port to the allow rule's.
    #[tokio::test]
    async fn client_checks_resolved_and_connected_addresses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello" }));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let url = format!("http://localhost:{}/", addr.port());
        let fetch = |allow: Vec<AllowRule>| {
            let url = url.clone();
            async move {
                let p = OutboundPolicy::new(allow, vec![]);
                let c = p
                    .client(Duration::from_secs(5), Some(Duration::from_secs(10)))
                    .unwrap();
                p.send(c.get(&url)).await
            }
        };
        match fetch(vec![]).await {
            Err(SendError::Refused(Refusal::Resolved { host, .. })) => {
                assert_eq!(host, "localhost")
            }
            other => panic!("{other:?}"),
        }
        let other_port = AllowRule::exact(SocketAddr::new(addr.ip(), addr.port() ^ 1));
        match fetch(vec![other_port]).await {
            Err(SendError::Refused(Refusal::Address {
                url: u,
                addr,
                class,
            })) => {
                assert_eq!(class, AddressClass::Loopback);
                assert_eq!(addr, "127.0.0.1");
                assert_eq!(u, url);
            }
            other => panic!("{other:?}"),
        }
        let r = fetch(vec![AllowRule::exact(addr)]).await.unwrap();
        assert_eq!(read_capped(r, 100).await.unwrap().as_ref(), b"hello");
        let r = fetch(vec![AllowRule::exact(addr)]).await.unwrap();
        assert!(matches!(
            read_capped(r, 3).await,
            Err(SendError::Refused(Refusal::TooLarge { limit: 3, .. }))
        ));
    }

    #[tokio::test]
    async fn names_resolving_to_refused_addresses() {
        let p = OutboundPolicy::new(vec![], vec![]);
        let e = p
            .check_url_resolved(
                &Url::parse("http://localhost:8004/x").unwrap(),
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, Refusal::Resolved { .. }), "{e}");
        assert!(e.to_string().contains("loopback"), "{e}");
        // A name that does not resolve is left to the fetch.
        p.check_url_resolved(
            &Url::parse("http://no-such-host.invalid/x").unwrap(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    }
}
