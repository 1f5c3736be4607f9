//! A small HTTP server of the test, on the DUT network: DUTs fetch their scripts from it and
//! post results back, and it plays an upstream for the gateway (a redirect to somewhere
//! internal). One thread per connection; each request is answered by the scenario's handler
//! and remembered with its source address.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest request the fixture reads (head and body): a DUT posts responses of a few KiB.
const MAX_REQUEST: usize = 4 * 1024 * 1024;

/// A request to the fixture.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The path, query included, as sent.
    pub target: String,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
}

impl Request {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// What the handler answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        Self::status(200, body)
    }

    pub fn status(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn redirect(location: &str) -> Self {
        Self {
            status: 302,
            headers: vec![("location".into(), location.into())],
            body: Vec::new(),
        }
    }
}

pub type Handler = dyn Fn(&Request) -> Reply + Send + Sync;

/// The running server; stops accepting when dropped.
pub struct Fixture {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<(SocketAddr, String)>>>,
    stop: Arc<AtomicBool>,
}

impl Fixture {
    /// Serves `listener` (bound by the caller, e.g. inside a network namespace).
    pub fn serve(listener: TcpListener, handler: Arc<Handler>) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        // Non-blocking, so that the accept loop sees `stop`.
        listener.set_nonblocking(true)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let handler = handler.clone();
                        let seen = seen2.clone();
                        std::thread::spawn(move || {
                            if let Some(req) = read_request(&stream, peer) {
                                seen.lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push((peer, format!("{} {}", req.method, req.target)));
                                write_reply(stream, &handler(&req));
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self { addr, seen, stop })
    }

    /// Every request so far: its source and `METHOD target`.
    pub fn seen(&self) -> Vec<(SocketAddr, String)> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read_request(mut stream: &TcpStream, peer: SocketAddr) -> Option<Request> {
    stream.set_nonblocking(false).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 || buf.len() > MAX_REQUEST {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut words = head.split_whitespace();
    let method = words.next()?.to_string();
    let target = words.next()?.to_string();
    let length: usize = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
        .min(MAX_REQUEST);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Some(Request {
        method,
        target,
        body,
        peer,
    })
}

fn write_reply(mut stream: TcpStream, reply: &Reply) {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nconnection: close\r\ncontent-length: {}\r\n",
        reply.status,
        match reply.status {
            200 => "OK",
            302 => "Found",
            404 => "Not Found",
            _ => "Other",
        },
        reply.body.len()
    );
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.set_write_timeout(Some(Duration::from_secs(30)));
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&reply.body);
}
