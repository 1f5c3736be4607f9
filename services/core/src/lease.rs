//! Lease-bound credentials (design.md §10: capabilities follow the lease).
//!
//! The holder of a machine's current lease, the job process running on it, has no token: it
//! calls the services that act on that machine (boot configs and job script, the machine's
//! PDU port, its console) with the lease id in [`LEASE_HEADER`]. mars shows a lease id only to
//! admins, the gateway's services and the lease's own holder, so presenting it proves holding
//! the machine. The service called checks it with mars ([`LeaseCheck`]) on every request: a
//! lease that expired or was released stops working at once.
//!
//! [`authorize`] is the one rule every service applies: a token of the role the endpoint
//! needs, or else the current lease of the machine the request acts on. Only mars knows
//! leases, and this crate knows no service's business, so the check is an HTTP call that
//! reads only the fields it needs from mars' answer.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;

use crate::audit::Actor;
use crate::auth::{Auth, Identity, Role};
use crate::client::ApiClient;
use crate::config::GatewayConfig;
use crate::error::ApiError;
use crate::secret::Secret;
use crate::{MachineId, ServiceName};

/// The header a lease holder presents its lease id in (instead of a token).
pub const LEASE_HEADER: &str = "x-lease-id";

/// Longest wait for mars' answer: the lease holder's request waits meanwhile.
pub const MARS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("X-Lease-Id is empty or not text")]
    Malformed,
    #[error("X-Lease-Id is not the current lease of machine {0}")]
    NotHeld(MachineId),
    #[error("X-Lease-Id is not the current lease of a machine on PDU {pdu:?} port {port:?}")]
    NotHeldPort { pdu: String, port: String },
    #[error("machine {0} is unknown to mars, so it has no lease")]
    UnknownMachine(MachineId),
    #[error("cannot check the lease with mars: {0}")]
    Unavailable(String),
    /// mars answered 404 (what is not found depends on the question).
    #[error("mars does not know what was asked")]
    NotFound,
}

impl From<LeaseError> for ApiError {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::Malformed => ApiError::unauthorized(e.to_string()),
            LeaseError::NotHeld(_)
            | LeaseError::NotHeldPort { .. }
            | LeaseError::UnknownMachine(_) => ApiError::forbidden(e.to_string()),
            LeaseError::Unavailable(_) | LeaseError::NotFound => {
                ApiError::unavailable(e.to_string())
            }
        }
    }
}

/// The lease id a request presents: `None` without the header, `Err` when it is empty or not
/// text.
pub fn presented(headers: &HeaderMap) -> Option<Result<Secret, LeaseError>> {
    let value = headers.get(LEASE_HEADER)?;
    Some(
        value
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(Secret::new)
            .ok_or(LeaseError::Malformed),
    )
}

/// The default headers of a client that presents `lease_id` on every request (the value is
/// marked sensitive, so it stays out of debug output).
pub fn lease_headers(lease_id: &str) -> Result<HeaderMap, LeaseError> {
    let mut value = HeaderValue::from_str(lease_id).map_err(|_| LeaseError::Malformed)?;
    value.set_sensitive(true);
    let mut headers = HeaderMap::new();
    headers.insert(LEASE_HEADER, value);
    Ok(headers)
}

/// The default headers of a client that presents `token` on every request.
pub fn bearer_headers(token: &Secret) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(mut value) = HeaderValue::from_str(&format!("Bearer {}", token.expose())) {
        value.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, value);
    }
    headers
}

/// The fields of mars' machine record a lease check reads.
#[derive(Debug, Deserialize)]
struct MachineLease {
    id: MachineId,
    #[serde(default)]
    pdu: Option<String>,
    #[serde(default)]
    pdu_port_id: Option<String>,
    #[serde(default)]
    lease: Option<LeaseId>,
}

#[derive(Debug, Deserialize)]
struct LeaseId {
    #[serde(default)]
    id: String,
}

#[derive(Debug, Deserialize)]
struct MachineList {
    machines: Vec<MachineLease>,
}

impl MachineLease {
    /// Whether `lease` is this machine's current lease. A lease id mars did not show (an
    /// empty string) matches nothing, not even an empty lease.
    fn held_by(&self, lease: &Secret) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|l| !l.id.is_empty() && lease.matches(&l.id))
    }
}

/// Asks mars whether a lease is a machine's current one.
///
/// The request carries the service token (mars shows lease ids to the gateway's services) and
/// the presented lease (mars shows a lease id to its own holder), so a check also works where
/// no service token is configured. The comparison is made here, in constant time.
#[derive(Debug, Clone)]
pub struct LeaseCheck {
    /// `None`: this service was started without a mars to ask (tests of other parts).
    mars: Option<ApiClient>,
}

impl LeaseCheck {
    pub fn new(mars_url: impl Into<String>, token: Option<Secret>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(MARS_TIMEOUT)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            mars: Some(ApiClient::with_http(mars_url, token, http)),
        }
    }

    /// mars at the gateway's internal URL, asked with the service credential.
    pub fn for_gateway(gw: &GatewayConfig) -> Self {
        Self::new(
            gw.internal_url(ServiceName::Mars),
            crate::auth::service_token(gw),
        )
    }

    /// No mars to ask: every lease is refused as unverifiable (503).
    pub fn without_mars() -> Self {
        Self { mars: None }
    }

    async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        lease: &Secret,
    ) -> Result<T, LeaseError> {
        let Some(api) = &self.mars else {
            return Err(LeaseError::Unavailable(
                "this service was started without a mars to ask".into(),
            ));
        };
        let rb = api
            .request(reqwest::Method::GET, path)
            .headers(lease_headers(lease.expose())?);
        api.send(rb, path).await.map_err(|e| match e.status() {
            Some(StatusCode::NOT_FOUND) => LeaseError::NotFound,
            _ => LeaseError::Unavailable(e.to_string()),
        })
    }

    /// `Ok` when `lease` is `machine`'s current lease.
    pub async fn check(&self, machine: MachineId, lease: &Secret) -> Result<(), LeaseError> {
        let record: MachineLease = self
            .ask(&format!("/api/v1/machine/{machine}"), lease)
            .await
            .map_err(|e| match e {
                LeaseError::NotFound => LeaseError::UnknownMachine(machine),
                other => other,
            })?;
        if record.id == machine && record.held_by(lease) {
            Ok(())
        } else {
            Err(LeaseError::NotHeld(machine))
        }
    }

    /// The machine mars records on PDU `pdu` port `port`, if any: asked with the service
    /// credential alone (no lease is involved), for clients that switch outlets beside the
    /// machines (pdu's pdudaemon listeners).
    pub async fn machine_on_port(
        &self,
        pdu: &str,
        port: &str,
    ) -> Result<Option<MachineId>, LeaseError> {
        let Some(api) = &self.mars else {
            return Err(LeaseError::Unavailable(
                "this service was started without a mars to ask".into(),
            ));
        };
        let list: MachineList = api
            .get("/api/v1/machines")
            .await
            .map_err(|e| LeaseError::Unavailable(e.to_string()))?;
        Ok(list
            .machines
            .iter()
            .find(|m| m.pdu.as_deref() == Some(pdu) && m.pdu_port_id.as_deref() == Some(port))
            .map(|m| m.id))
    }

    /// The machine mars records on PDU `pdu` port `port`, when `lease` is its current lease.
    pub async fn check_port(
        &self,
        pdu: &str,
        port: &str,
        lease: &Secret,
    ) -> Result<MachineId, LeaseError> {
        let list: MachineList = self.ask("/api/v1/machines", lease).await?;
        list.machines
            .iter()
            .find(|m| {
                m.pdu.as_deref() == Some(pdu)
                    && m.pdu_port_id.as_deref() == Some(port)
                    && m.held_by(lease)
            })
            .map(|m| m.id)
            .ok_or_else(|| LeaseError::NotHeldPort {
                pdu: pdu.to_string(),
                port: port.to_string(),
            })
    }
}

/// What a lease-scoped request acts on.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Machine(MachineId),
    /// A PDU port: the machine is the one mars records on it.
    Port {
        pdu: &'a str,
        port: &'a str,
    },
}

/// Who a lease-scoped request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A token whose role passed the endpoint's check.
    Token(Identity),
    /// The holder of this machine's current lease.
    LeaseHolder(MachineId),
}

impl Caller {
    /// The caller for the audit log: the token's name, or `lease:<machine>` (never the lease
    /// id: it is a credential).
    pub fn actor(&self, source: impl ToString) -> Actor {
        match self {
            Caller::Token(id) => Actor::known(id, source),
            Caller::LeaseHolder(m) => Actor {
                name: format!("lease:{m}"),
                role: None,
                source: source.to_string(),
            },
        }
    }

    /// A token of at least `role` (an admin passes every check).
    pub fn has_role(&self, role: Role) -> bool {
        matches!(self, Caller::Token(id) if id.role.allows(role))
    }
}

/// The caller of a refused request, for the audit log: the token's name when it had a valid
/// one, `lease` when it presented a lease (which did not hold), else `anonymous` or `invalid`.
pub fn refused_actor(auth: &Auth, headers: &HeaderMap, source: impl ToString) -> Actor {
    let actor = Actor::from_headers(auth, headers, source);
    if actor.name == "anonymous" && headers.contains_key(LEASE_HEADER) {
        Actor {
            name: "lease".into(),
            ..actor
        }
    } else {
        actor
    }
}

/// A token of at least `needed`, or else the current lease of the machine `target` names.
///
/// A request with a token is judged by its token; when the token is not enough (or not valid)
/// and a lease is presented beside it, the lease decides. The refusal names what would do.
pub async fn authorize(
    auth: &Auth,
    leases: &LeaseCheck,
    headers: &HeaderMap,
    needed: Role,
    target: Target<'_>,
) -> Result<Caller, ApiError> {
    let lease = presented(headers);
    if headers.contains_key(header::AUTHORIZATION) || lease.is_none() {
        match auth.identify(headers) {
            Ok(id) if id.role.allows(needed) => return Ok(Caller::Token(id)),
            // A token that is not enough (or not valid), with a lease beside it: the lease
            // decides.
            _ if lease.is_some() => {}
            Ok(id) => {
                return Err(ApiError::forbidden(format!(
                    "this endpoint needs the {needed} role or the current lease of {} in \
                     X-Lease-Id; token {:?} is a {} token",
                    target_text(target),
                    id.name,
                    id.role
                )));
            }
            Err(e) if e.status == StatusCode::UNAUTHORIZED => {
                return Err(ApiError::unauthorized(format!(
                    "{}: this endpoint needs a {needed} token or the current lease of {} in \
                     X-Lease-Id",
                    e.body.error,
                    target_text(target)
                )));
            }
            Err(e) => return Err(e),
        }
    }
    let Some(lease) = lease else {
        return Err(ApiError::unauthorized("X-Lease-Id is missing"));
    };
    let lease = lease?;
    let machine = match target {
        Target::Machine(m) => leases.check(m, &lease).await.map(|_| m),
        Target::Port { pdu, port } => leases.check_port(pdu, port, &lease).await,
    }?;
    Ok(Caller::LeaseHolder(machine))
}

fn target_text(target: Target<'_>) -> String {
    match target {
        Target::Machine(m) => format!("machine {m}"),
        Target::Port { pdu, port } => format!("the machine on PDU {pdu:?} port {port:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn presented_leases() {
        assert!(presented(&HeaderMap::new()).is_none());
        assert!(matches!(
            presented(&headers(&[("x-lease-id", "  ")])),
            Some(Err(LeaseError::Malformed))
        ));
        let l = presented(&headers(&[("X-Lease-Id", " abc ")]))
            .unwrap()
            .unwrap();
        assert!(l.matches("abc"));
        let h = lease_headers("0123").unwrap();
        assert!(h[LEASE_HEADER].is_sensitive());
        assert!(lease_headers("a\nb").is_err());
    }

    #[test]
    fn hidden_lease_ids_match_nothing() {
        let m = MachineLease {
            id: MachineId::from_bytes([0x52, 0x54, 0, 0, 0, 1]),
            pdu: None,
            pdu_port_id: None,
            lease: Some(LeaseId { id: String::new() }),
        };
        assert!(!m.held_by(&Secret::new("")));
        assert!(!m.held_by(&Secret::new("x")));
    }

    #[tokio::test]
    async fn tokens_first_then_the_lease() {
        let auth = Auth::new(
            Some(Secret::new("adm")),
            Some(Secret::new("usr")),
            Vec::new(),
        );
        let m = MachineId::from_bytes([0x52, 0x54, 0, 0, 0, 1]);
        let none = LeaseCheck::without_mars();
        let admin = authorize(
            &auth,
            &none,
            &headers(&[("authorization", "Bearer adm")]),
            Role::Service,
            Target::Machine(m),
        )
        .await
        .unwrap();
        assert!(admin.has_role(Role::Admin));
        assert_eq!(admin.actor("1.2.3.4:5").name, "admin");

        let e = authorize(
            &auth,
            &none,
            &headers(&[("authorization", "Bearer usr")]),
            Role::Service,
            Target::Machine(m),
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert!(e.body.error.contains("service role"), "{}", e.body.error);
        assert!(e.body.error.contains("X-Lease-Id"), "{}", e.body.error);

        let e = authorize(
            &auth,
            &none,
            &HeaderMap::new(),
            Role::Service,
            Target::Machine(m),
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert!(e.body.error.contains("X-Lease-Id"), "{}", e.body.error);

        // A lease beside a token that is not enough is checked; no mars: 503, not a pass.
        let e = authorize(
            &auth,
            &none,
            &headers(&[("authorization", "Bearer usr"), ("x-lease-id", "abc")]),
            Role::Service,
            Target::Port {
                pdu: "p",
                port: "1",
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.body.error.contains("mars"), "{}", e.body.error);

        let holder = Caller::LeaseHolder(m);
        assert_eq!(holder.actor("src").name, format!("lease:{m}"));
        assert!(!holder.has_role(Role::User));
        let refused = refused_actor(&auth, &headers(&[("x-lease-id", "abc")]), "src");
        assert_eq!(refused.name, "lease");
    }
}
