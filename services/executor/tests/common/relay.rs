//! TCP relays that a test cuts: up, each connection is forwarded to the upstream; cut, every
//! relayed connection is closed and every new one too — what clients see of a killed peer —
//! until the relay is restored. [`SaladRelays`] puts the farm's salad behind relays.

use std::net::SocketAddr;
use std::time::Duration;

use dutgate_core::Secret;
use dutgate_executor::Config as ExecConfig;
use dutgate_salad::client::SaladClient;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{ADMIN, Farm};

#[derive(Clone, Copy)]
struct Link {
    up: bool,
    /// Counts the cuts: a connection relayed before a cut ends with it.
    cuts: u64,
}

pub struct Relay {
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// A relay listening on `listen` (port 0: any) to `upstream`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| panic!("a relay on {listen}: {e}"));
        let addr = listener.local_addr().expect("the relay's address");
        let (link, watch) = watch::channel(Link { up: true, cuts: 0 });
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let at = *watch.borrow();
                if !at.up {
                    continue;
                }
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    // Ends with either side, a cut, or the relay's end (the sender dropped).
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.wait_for(|l| l.cuts != at.cuts) => {}
                    }
                });
            }
        });
        Relay { addr, link, accept }
    }

    pub fn cut(&self) {
        self.link.send_modify(|l| {
            l.up = false;
            l.cuts += 1;
        });
    }

    pub fn restore(&self) {
        self.link.send_modify(|l| l.up = true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The farm's salad as the job processes see it, behind relays: its API on a port of its own,
/// and each machine's console port on the same port of [`SaladRelays::CONSOLE_HOST`] (salad's
/// API names the port, the job connects to it on `executor.console_host`).
pub struct SaladRelays {
    api: Relay,
    consoles: Vec<Relay>,
}

impl SaladRelays {
    pub const CONSOLE_HOST: &str = "127.0.0.2";

    pub async fn start(farm: &Farm) -> SaladRelays {
        let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let salad = SaladClient::new(
            format!("http://127.0.0.1:{}", farm.gw.ports.salad),
            Some(Secret::new(ADMIN)),
        );
        let mut consoles = Vec::new();
        for m in &farm.machines {
            let port = salad
                .machine(*m)
                .await
                .unwrap_or_else(|e| panic!("salad's console of {m}: {e}"))
                .tcp_port;
            let listen: SocketAddr = format!("{}:{port}", Self::CONSOLE_HOST)
                .parse()
                .expect("a socket address");
            consoles.push(Relay::start(listen, local(port)).await);
        }
        SaladRelays {
            api: Relay::start(local(0), local(farm.gw.ports.salad)).await,
            consoles,
        }
    }

    /// Points executors (and their job processes) at the relays from their next start.
    pub fn route(&self, cfg: &mut ExecConfig) {
        cfg.salad_url = Some(format!("http://{}", self.api.addr));
        cfg.console_host = Some(Self::CONSOLE_HOST.into());
    }

    /// salad is gone, as far as the job processes can tell.
    pub fn cut(&self) {
        self.api.cut();
        self.consoles.iter().for_each(Relay::cut);
    }

    pub fn restore(&self) {
        self.api.restore();
        self.consoles.iter().for_each(Relay::restore);
    }
}
