//! Whether a console stream may bind to the machine it announces (design.md §10: a console
//! stream is never bound to another machine by what a DUT prints).
//!
//! An **unbound** stream that prints `SALAD.machine_id=X` is bound to X only when all hold:
//!
//! 1. no live stream is bound to X (a machine has one console, and it is never taken over by
//!    an announcement);
//! 2. X is expected to speak: a boot of X was announced by an admin or by the holder of X's
//!    lease (`PUT /api/v1/machine/{id}/expect`, just before it powers X on), or mars says X
//!    is unknown (a DUT registering; such consoles are bounded by
//!    `max_unregistered_consoles`), or X is in its own registration/check boot
//!    (`WAIT_FOR_CONFIG`, `TRAINING`, `QUICK_CHECK`);
//! 3. for a netconsole, the peer is X's address as mars recorded it, unless the connection
//!    comes from the gateway itself (its source is the address it dialled): with QEMU user
//!    networking every virtual DUT's console is dialled by a QEMU process on the gateway, and
//!    loopback is accepted on the netconsole port only when it is a DUT network.
//!
//! A **bound** stream is never re-bound by what it prints; only an admin moves it
//! (`PUT /api/v1/ports/{stream}/machine`). Every refusal is logged and recorded on the
//! machine it named (and on the stream's own machine), where the job reads it.
//!
//! The decision asks mars, so it runs on its own task: the stream keeps being read meanwhile.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use dutgate_core::MachineId;
use dutgate_mars::model::MachineState;
use tokio::sync::mpsc;

use crate::hub::{Hub, MarsView};
use crate::relay::{Machine, StreamId};

/// The stream asking to be bound.
#[derive(Clone)]
pub struct Claim {
    pub stream: StreamId,
    /// The netconsole's peer (`None` for a serial port).
    pub peer: Option<IpAddr>,
    /// The gateway's address the netconsole connected to.
    pub local: Option<IpAddr>,
    /// Where the machine's client input goes once bound.
    pub input: mpsc::Sender<Bytes>,
    /// The serial adapter's stable path: the binding is remembered under it.
    pub key: Option<String>,
}

/// True for the states in which a machine boots for its own registration or check.
fn in_own_check(state: MachineState) -> bool {
    matches!(
        state,
        MachineState::WaitForConfig | MachineState::Training | MachineState::QuickCheck
    )
}

/// Decides, and on success binds (the machine's input now goes to `claim.stream`).
/// `Err` is the reason of the refusal, one sentence.
pub async fn decide(
    hub: &Arc<Hub>,
    claim: &Claim,
    machine: MachineId,
) -> Result<Arc<Machine>, String> {
    const TAKEN: &str = "another console stream is bound to the machine";
    if hub.get(machine).is_some_and(|m| m.has_console()) {
        return Err(TAKEN.into());
    }
    let expected = hub.is_expected(machine);
    // A netconsole from the gateway itself (it connected to its own address: QEMU running on
    // the gateway) cannot be told apart by address.
    let remote = claim
        .peer
        .map(|p| p.to_canonical())
        .filter(|p| Some(*p) != claim.local.map(|l| l.to_canonical()));
    let view = if expected && remote.is_none() {
        None
    } else {
        Some(hub.mars_machine(machine).await?)
    };
    let unregistered = matches!(view, Some(MarsView::Unknown));
    if !expected {
        match &view {
            Some(MarsView::Unknown) => {}
            Some(MarsView::Known(m)) if in_own_check(m.state) => {}
            Some(MarsView::Known(m)) => {
                return Err(format!(
                    "machine is {} and no boot of it was announced (PUT /api/v1/machine/{machine}/expect)",
                    m.state
                ));
            }
            None => return Err("no boot of the machine was announced".into()),
        }
    }
    if let (Some(peer), Some(MarsView::Known(m))) = (remote, &view)
        && let Some(ip) = m.ip_address
        && ip.to_canonical() != peer
    {
        return Err(format!(
            "netconsole from {peer}, but the machine's address is {ip}"
        ));
    }
    let relay = if unregistered && !expected {
        hub.get_or_create_unregistered(machine).await
    } else {
        hub.get_or_create(machine).await
    }
    .map_err(|e| e.to_string())?;
    if !relay.try_attach_input(claim.stream, claim.input.clone()) {
        return Err(TAKEN.into());
    }
    hub.clear_expectation(machine);
    if let Some(key) = &claim.key {
        // Written before the stream shows as bound: a restart right after finds it.
        if let Err(e) = hub.store.bind_path(key, machine).await {
            tracing::error!(path = %key, %machine, error = %e, "cannot remember the adapter's machine");
        }
    }
    Ok(relay)
}
