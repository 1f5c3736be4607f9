//! The interactive console of `dutctl run`: when stdin is a terminal, keystrokes go to the DUT
//! through the executor's console WebSocket (`/api/v1/jobs/{id}/console/ws`), the terminal is
//! put in raw mode (restored on every exit path), and Ctrl-A Ctrl-C quits (the job is
//! cancelled by the caller). The keystrokes of a caller who is neither the job's owner nor an
//! admin are refused by the executor: its reason is printed once and the console goes on
//! read-only.

use std::time::Duration;

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Ctrl-A: the escape key; Ctrl-A Ctrl-C quits, Ctrl-A Ctrl-A sends one Ctrl-A.
const ESCAPE: u8 = 0x01;
const CTRL_C: u8 = 0x03;

pub fn stdin_is_tty() -> bool {
    // SAFETY: isatty(3) only inspects the descriptor.
    unsafe { libc::isatty(0) == 1 }
}

/// Raw mode on the terminal on stdin for as long as it lives. Output post-processing stays
/// on, so that `\n` in dutctl's own lines still returns the carriage.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    pub fn enable() -> Option<RawMode> {
        // SAFETY: termios is plain data; tcgetattr/tcsetattr get a valid pointer to it.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            t.c_oflag |= libc::OPOST | libc::ONLCR;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(RawMode { saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `enable`.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.saved);
        }
    }
}

/// What the keyboard asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    Bytes(Vec<u8>),
    Quit,
}

/// Splits keystrokes into bytes for the DUT and the quit sequence; `pending` carries an
/// escape key across reads.
pub fn decode_keys(buf: &[u8], pending: &mut bool) -> Vec<Input> {
    let mut out = Vec::new();
    let mut bytes = Vec::new();
    for &b in buf {
        if *pending {
            *pending = false;
            match b {
                CTRL_C => {
                    if !bytes.is_empty() {
                        out.push(Input::Bytes(std::mem::take(&mut bytes)));
                    }
                    out.push(Input::Quit);
                    return out;
                }
                ESCAPE => bytes.push(ESCAPE),
                other => {
                    bytes.push(ESCAPE);
                    bytes.push(other);
                }
            }
        } else if b == ESCAPE {
            *pending = true;
        } else {
            bytes.push(b);
        }
    }
    if !bytes.is_empty() {
        out.push(Input::Bytes(bytes));
    }
    out
}

/// Reads stdin on a thread of its own (a blocking read would keep the async runtime from
/// shutting down) and sends what the keyboard asks for.
pub fn keyboard() -> mpsc::Receiver<Input> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 256];
        let mut pending = false;
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for input in decode_keys(&buf[..n], &mut pending) {
                let quit = input == Input::Quit;
                if tx.blocking_send(input).is_err() || quit {
                    return;
                }
            }
        }
    });
    rx
}

/// How the interactive console ended.
pub enum End {
    /// The job finished and every console byte was shown.
    Finished,
    /// Ctrl-A Ctrl-C.
    Quit,
}

/// What a text frame of the console WebSocket says.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// `{"error": …, "status": 403}`: keystrokes are refused, the output goes on.
    Refused(String),
    /// The job's end, `{"status": …, "exit_code": …}` (or anything else: the executor sends no
    /// other text frame).
    End,
}

pub fn text_frame(text: &str) -> Frame {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => match v.get("error").and_then(|e| e.as_str()) {
            Some(error) => Frame::Refused(error.to_string()),
            None => Frame::End,
        },
        Err(_) => Frame::End,
    }
}

/// Streams the console over the WebSocket and forwards the keyboard, reconnecting from the
/// last offset when the connection drops.
pub async fn console(
    exec_url: &str,
    token: Option<&str>,
    id: i64,
    keys: &mut mpsc::Receiver<Input>,
) -> anyhow::Result<End> {
    let ws_base = if let Some(rest) = exec_url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = exec_url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        bail!("{exec_url}: not an http(s) URL");
    };
    let mut offset = 0u64;
    let mut failures = 0u32;
    let mut out = tokio::io::stdout();
    let mut keyboard_open = true;
    // Until the executor refuses a keystroke: then the session is read-only, reconnections
    // included.
    let mut typing = true;
    loop {
        let url = format!("{ws_base}/api/v1/jobs/{id}/console/ws?offset={offset}");
        let mut req = url.as_str().into_client_request()?;
        if let Some(t) = token {
            req.headers_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().context("token")?,
            );
        }
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(req),
        )
        .await;
        let mut ws = match conn {
            Ok(Ok((ws, _))) => ws,
            // The executor restarting, a network blip: retry for about two minutes.
            Ok(Err(_)) if failures < 240 => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Ok(Err(e)) => bail!("console of job {id}: {e}"),
            Err(_) if failures < 240 => {
                failures += 1;
                continue;
            }
            Err(_) => bail!("console of job {id}: connection timed out"),
        };
        failures = 0;
        loop {
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Binary(b))) => {
                        out.write_all(&b).await?;
                        out.flush().await?;
                        offset += b.len() as u64;
                    }
                    Some(Ok(Message::Text(t))) => match text_frame(t.as_str()) {
                        // Keystrokes refused (someone else's job): said once, then watch.
                        Frame::Refused(error) => {
                            if typing {
                                typing = false;
                                eprintln!("dutctl: {error}");
                            }
                        }
                        // The final status: every byte was sent before it.
                        Frame::End => return Ok(End::Finished),
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
                key = keys.recv(), if keyboard_open => match key {
                    // A read-only session keeps the keyboard for Ctrl-A Ctrl-C only.
                    Some(Input::Bytes(_)) if !typing => {}
                    Some(Input::Bytes(b)) => {
                        // Input to a job not running is dropped by the executor; a failed send
                        // shows up as a closed stream above.
                        let _ = ws.send(Message::Binary(b.into())).await;
                    }
                    Some(Input::Quit) => {
                        let _ = ws.close(None).await;
                        return Ok(End::Quit);
                    }
                    None => keyboard_open = false,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_frames() {
        assert_eq!(
            text_frame(r#"{"error":"job 4 belongs to another user","status":403}"#),
            Frame::Refused("job 4 belongs to another user".into())
        );
        assert_eq!(text_frame(r#"{"status":"PASS","exit_code":0}"#), Frame::End);
        assert_eq!(text_frame("not json"), Frame::End);
    }

    #[test]
    fn escape_sequences() {
        let mut p = false;
        assert_eq!(
            decode_keys(b"ls\r", &mut p),
            vec![Input::Bytes(b"ls\r".to_vec())]
        );
        assert_eq!(
            decode_keys(b"a\x01\x03b", &mut p),
            vec![Input::Bytes(b"a".to_vec()), Input::Quit]
        );
        // The escape split across two reads.
        assert_eq!(
            decode_keys(b"x\x01", &mut p),
            vec![Input::Bytes(b"x".to_vec())]
        );
        assert!(p);
        assert_eq!(decode_keys(b"\x03", &mut p), vec![Input::Quit]);
        p = false;
        assert_eq!(
            decode_keys(b"\x01\x01\x01q", &mut p),
            vec![Input::Bytes(b"\x01\x01q".to_vec())]
        );
    }
}
