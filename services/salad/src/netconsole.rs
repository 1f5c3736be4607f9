//! Netconsoles: TCP connections that carry a console (QEMU's `-chardev socket` dials in, or a
//! remote serial server). Each connection is treated exactly like a serial port; it is bound
//! by its `SALAD.machine_id=` line (see [`crate::binding`] for when that is granted). Only
//! peers on the DUT networks are accepted (design §10), at most `max_netconsoles` at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dutgate_core::auth::Auth;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::stream::{self, End, StreamSpec};

/// Accepts netconsoles until `cancel` fires.
pub async fn run(hub: Arc<Hub>, listener: TcpListener, auth: Auth, cancel: CancellationToken) {
    let connections = metrics::counter!("salad_netconsole_connections_total");
    let refused = metrics::counter!("salad_netconsole_refused_total");
    let open = Arc::new(AtomicUsize::new(0));
    let max = hub.config.max_netconsoles;
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (sock, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "netconsole accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !auth.is_dut_address(peer.ip()) {
            refused.increment(1);
            tracing::warn!(%peer, "netconsole refused: peer is not on a DUT network");
            continue;
        }
        if open.load(Ordering::Acquire) >= max {
            refused.increment(1);
            tracing::warn!(%peer, max, "netconsole refused: salad.max_netconsoles connections are open");
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        connections.increment(1);
        let _ = sock.set_nodelay(true);
        let name = format!("netconsole {peer}");
        tracing::info!(%peer, "netconsole connected");
        let spec = StreamSpec {
            kind: "netconsole",
            name: name.clone(),
            key: None,
            initial: None,
            metrics_port: "netconsole".into(),
            peer: Some(peer.ip()),
            local: sock.local_addr().ok().map(|a| a.ip()),
        };
        let hub2 = hub.clone();
        let stop = cancel.clone();
        let open2 = open.clone();
        hub.tasks.spawn(async move {
            let end = stream::drive(hub2, sock, spec, stop).await;
            open2.fetch_sub(1, Ordering::AcqRel);
            match end {
                End::Shutdown => {}
                End::Eof => tracing::info!(console = %name, "netconsole closed"),
                End::ReadError(e) | End::WriteError(e) => {
                    tracing::info!(console = %name, error = %e, "netconsole failed; closed")
                }
            }
        });
    }
}
