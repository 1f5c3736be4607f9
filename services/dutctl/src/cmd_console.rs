//! `dutctl console MACHINE`: a machine's console through salad's WebSocket
//! (`GET /api/v1/machine/{id}/console`), like `ssh` to a serial console server.
//!
//! salad lets the service role (admins included) or the holder of the machine's lease open
//! it; it is two-way. When stdin is a terminal, the terminal goes to raw mode and `~.` at the
//! start of a line quits (`~~` sends one `~`), as in ssh. Otherwise stdin's bytes are sent
//! as they come (nothing special about `~`) and the output is a plain stream on stdout;
//! SIGINT/SIGTERM end the session. `--read-only` follows the console's log instead, which
//! every token may read: nothing typed reaches the DUT.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use dutgate_core::{MachineId, ServiceName};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::gateway::Gateway;
use crate::interactive::{Input, RawMode, stdin_is_tty};

#[derive(Args)]
pub struct ConsoleArgs {
    /// The machine: MAC address or full name.
    machine: String,
    /// Only watch: follow the console's log (the last minute, then live). Any token may.
    #[arg(long)]
    read_only: bool,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// salad's header naming the offset just past a log response (the next `since`).
const LOG_END_HEADER: &str = "x-log-end";
/// How often the read-only mode asks for new log bytes.
const LOG_POLL: Duration = Duration::from_millis(300);

/// Splits keystrokes into bytes for the DUT and ssh's `~.`: a `~` right after a newline (or
/// first of all) is held until the next key says what it is. `at_line_start` and `pending`
/// carry over between reads.
pub fn decode_tilde(buf: &[u8], at_line_start: &mut bool, pending: &mut bool) -> Vec<Input> {
    let mut out = Vec::new();
    let mut bytes = Vec::new();
    for &b in buf {
        if *pending {
            *pending = false;
            match b {
                b'.' => {
                    if !bytes.is_empty() {
                        out.push(Input::Bytes(std::mem::take(&mut bytes)));
                    }
                    out.push(Input::Quit);
                    return out;
                }
                b'~' => {
                    bytes.push(b'~');
                    *at_line_start = false;
                    continue;
                }
                _ => bytes.push(b'~'),
            }
        } else if b == b'~' && *at_line_start {
            *pending = true;
            continue;
        }
        bytes.push(b);
        *at_line_start = b == b'\r' || b == b'\n';
    }
    if !bytes.is_empty() {
        out.push(Input::Bytes(bytes));
    }
    out
}

/// Reads stdin on a thread of its own (a blocking read must not hold the runtime): on a
/// terminal with the `~.` escape, else the bytes as they are. The channel closes at EOF.
fn keyboard(tty: bool) -> mpsc::Receiver<Input> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        let (mut at_line_start, mut pending) = (true, false);
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let inputs = if tty {
                decode_tilde(&buf[..n], &mut at_line_start, &mut pending)
            } else {
                vec![Input::Bytes(buf[..n].to_vec())]
            };
            for input in inputs {
                let quit = input == Input::Quit;
                if tx.blocking_send(input).is_err() || quit {
                    return;
                }
            }
        }
    });
    rx
}

fn ws_url(http: &str) -> anyhow::Result<String> {
    if let Some(rest) = http.strip_prefix("http://") {
        Ok(format!("ws://{rest}"))
    } else if let Some(rest) = http.strip_prefix("https://") {
        Ok(format!("wss://{rest}"))
    } else {
        bail!("{http}: not an http(s) URL")
    }
}

/// The machine's id: a MAC as is, a full name looked up in mars.
async fn machine_id(gw: &Gateway, name: &str) -> anyhow::Result<MachineId> {
    if let Ok(id) = MachineId::parse(name) {
        return Ok(id);
    }
    let mars =
        dutgate_mars::client::MarsClient::new(gw.url(ServiceName::Mars), gw.token().cloned());
    crate::cmd_machines::resolve(&mars, name).await
}

pub async fn run(args: ConsoleArgs, gw: &Gateway) -> anyhow::Result<()> {
    let id = machine_id(gw, &args.machine).await?;
    if args.read_only {
        return follow_log(gw, id).await;
    }
    let url = format!(
        "{}/api/v1/machine/{id}/console",
        ws_url(gw.url(ServiceName::Salad))?
    );
    let mut req = url.as_str().into_client_request()?;
    if let Some(t) = gw.token() {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", t.expose())
                .parse()
                .context("the token is not a valid header value")?,
        );
    }
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(req))
        .await
        .map_err(|_| anyhow::anyhow!("console of {id}: {url}: connection timed out"))?;
    let mut ws = match conn {
        Ok((ws, _)) => ws,
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status();
            let reason = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_default();
            let hint = if status == reqwest::StatusCode::FORBIDDEN {
                " (a two-way console needs an admin or service token or the machine's lease; \
                 to watch it: dutctl console --read-only)"
            } else {
                ""
            };
            bail!("console of {id}: {status}: {reason}{hint}");
        }
        Err(e) => bail!("console of {id}: {url}: {e}"),
    };
    let tty = stdin_is_tty();
    let raw = if tty { RawMode::enable() } else { None };
    if tty {
        eprintln!("dutctl: console of {id}: ~. quits\r");
    }
    let mut keys = keyboard(tty);
    let mut keyboard_open = true;
    let mut out = tokio::io::stdout();
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let end = loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    out.write_all(&b).await?;
                    out.flush().await?;
                }
                Some(Ok(Message::Text(t))) => {
                    out.write_all(t.as_str().as_bytes()).await?;
                    out.flush().await?;
                }
                Some(Ok(Message::Close(_))) | None => break Ok(()),
                Some(Err(e)) => break Err(anyhow::anyhow!("console of {id}: {e}")),
                Some(Ok(_)) => {}
            },
            key = keys.recv(), if keyboard_open => match key {
                Some(Input::Bytes(b)) => {
                    if let Err(e) = ws.send(Message::Binary(b.into())).await {
                        break Err(anyhow::anyhow!("console of {id}: {e}"));
                    }
                }
                Some(Input::Quit) => break Ok(()),
                // stdin ended: the output goes on until the session is ended otherwise.
                None => keyboard_open = false,
            },
            _ = sigint.recv() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    drop(raw);
    end
}

/// `--read-only`: the last minute of the log, then what comes, by offset.
async fn follow_log(gw: &Gateway, id: MachineId) -> anyhow::Result<()> {
    let salad = gw.client(ServiceName::Salad);
    eprintln!("dutctl: console of {id}, read-only (its log): Ctrl-C quits");
    let minute_ago = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    let mut since = minute_ago
        .format(&time::format_description::well_known::Rfc3339)
        .context("formatting a time")?;
    let mut out = tokio::io::stdout();
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let path = format!(
            "/api/v1/machine/{id}/log?since={}",
            dutgate_core::http::encode_component(&since)
        );
        let resp = salad
            .request(reqwest::Method::GET, &path)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .with_context(|| format!("log of {id}"))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let reason = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(body);
            bail!("log of {id}: {status}: {reason}");
        }
        let end = resp
            .headers()
            .get(LOG_END_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp.bytes().await.with_context(|| format!("log of {id}"))?;
        out.write_all(&bytes).await?;
        out.flush().await?;
        if let Some(end) = end {
            since = end;
        }
        tokio::select! {
            _ = tokio::time::sleep(LOG_POLL) => {}
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tilde_escape() {
        let (mut start, mut p) = (true, false);
        assert_eq!(
            decode_tilde(b"ls\r", &mut start, &mut p),
            vec![Input::Bytes(b"ls\r".to_vec())]
        );
        assert!(start);
        assert_eq!(decode_tilde(b"~.", &mut start, &mut p), vec![Input::Quit]);
        // Not at a line's start: a plain `~`.
        let (mut start, mut p) = (false, false);
        assert_eq!(
            decode_tilde(b"a~.", &mut start, &mut p),
            vec![Input::Bytes(b"a~.".to_vec())]
        );
        // `~~` sends one; `~x` sends both; the escape split across reads.
        let (mut start, mut p) = (true, false);
        assert_eq!(
            decode_tilde(b"~~\n~x", &mut start, &mut p),
            vec![Input::Bytes(b"~\n~x".to_vec())]
        );
        assert_eq!(
            decode_tilde(b"\r~", &mut start, &mut p),
            vec![Input::Bytes(b"\r".to_vec())]
        );
        assert!(p);
        assert_eq!(decode_tilde(b".", &mut start, &mut p), vec![Input::Quit]);
    }
}
