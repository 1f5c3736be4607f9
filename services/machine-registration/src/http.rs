//! A blocking HTTP/1.1 client over `std::net::TcpStream`, enough for the DUT-side agents: two
//! JSON calls to mars, and S3 object transfers of the job bucket.
//!
//! No DNS: the host must be an IP address or listed in `/etc/hosts` (a statically linked
//! binary cannot use glibc's NSS resolver, and an initramfs rarely has one configured).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad URL {0:?}: expected http://<ip or /etc/hosts name>[:port][/path]")]
    Url(String),
    #[error(
        "cannot resolve {0:?}: use an IP address (the agent does no DNS) or add it to /etc/hosts"
    )]
    Resolve(String),
    #[error("{addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: malformed HTTP response")]
    Malformed(SocketAddr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `error` of a JSON error body, else the text.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| {
                let e = v.get("error")?.as_str()?.to_string();
                Some(match v.get("field").and_then(|f| f.as_str()) {
                    Some(f) => format!("{e} (field {f})"),
                    None => e,
                })
            })
            .unwrap_or_else(|| self.text().chars().take(300).collect())
    }
}

/// `http://host[:port]` split into a socket address, the Host header and a base path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub host: String,
    pub base_path: String,
}

fn hosts_lookup(name: &str, hosts: &str) -> Option<IpAddr> {
    hosts.lines().find_map(|l| {
        let l = l.split('#').next()?;
        let mut it = l.split_whitespace();
        let ip: IpAddr = it.next()?.parse().ok()?;
        it.any(|n| n.eq_ignore_ascii_case(name)).then_some(ip)
    })
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, HttpError> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| HttpError::Url(url.to_string()))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, p) = h
                .split_once(']')
                .ok_or_else(|| HttpError::Url(url.to_string()))?;
            (h, p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        let port: u16 = match port {
            Some(p) => p.parse().map_err(|_| HttpError::Url(url.to_string()))?,
            None => 80,
        };
        if host.is_empty() {
            return Err(HttpError::Url(url.to_string()));
        }
        let ip = match host.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => std::fs::read_to_string("/etc/hosts")
                .ok()
                .and_then(|h| hosts_lookup(host, &h))
                .ok_or_else(|| HttpError::Resolve(host.to_string()))?,
        };
        Ok(Self {
            addr: SocketAddr::new(ip, port),
            host: hostport.to_string(),
            base_path: path.to_string(),
        })
    }

    /// Sends one JSON request (`Connection: close`) and reads the whole answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        json: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        let mut headers = vec![("Accept".to_string(), "application/json".to_string())];
        if json.is_some() {
            headers.push(("Content-Type".to_string(), "application/json".to_string()));
        }
        self.send(method, path, &headers, json, timeout)
    }

    /// Sends one request with the given extra headers and body (`Connection: close`) and reads
    /// the whole answer (at most 16 MiB). `path` may carry a query string.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Response, HttpError> {
        let io = |source| HttpError::Io {
            addr: self.addr,
            source,
        };
        let mut s = TcpStream::connect_timeout(&self.addr, timeout).map_err(io)?;
        s.set_read_timeout(Some(timeout)).map_err(io)?;
        s.set_write_timeout(Some(timeout)).map_err(io)?;
        let mut req = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: dutgate-dut-agent\r\nConnection: close\r\n",
            self.base_path, self.host
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        } else if matches!(method, "PUT" | "POST") {
            req.push_str("Content-Length: 0\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).map_err(io)?;
        if let Some(b) = body {
            s.write_all(b).map_err(io)?;
        }
        let mut raw = Vec::new();
        s.take(16 << 20).read_to_end(&mut raw).map_err(io)?;
        parse_response(&raw).ok_or(HttpError::Malformed(self.addr))
    }
}

fn find(h: &[u8], needle: &[u8]) -> Option<usize> {
    h.windows(needle.len()).position(|w| w == needle)
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let head_end = find(raw, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let (k, v) = l.split_once(':')?;
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = v.parse::<usize>().ok();
        }
    }
    let rest = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        match length {
            Some(n) => rest.get(..n)?.to_vec(),
            None => rest.to_vec(),
        }
    };
    Some(Response { status, body })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = find(b, b"\r\n")?;
        let size_str = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let e = Endpoint::parse("http://10.42.0.1:8001").unwrap();
        assert_eq!(e.addr, "10.42.0.1:8001".parse().unwrap());
        assert_eq!(e.base_path, "");
        let e = Endpoint::parse("http://[::1]:9/x/").unwrap();
        assert_eq!(e.addr, "[::1]:9".parse().unwrap());
        assert_eq!(e.base_path, "/x");
        assert_eq!(Endpoint::parse("http://127.0.0.1").unwrap().addr.port(), 80);
        assert!(matches!(
            Endpoint::parse("https://x"),
            Err(HttpError::Url(_))
        ));
        assert!(matches!(
            Endpoint::parse("http://no-such-host.invalid:1"),
            Err(HttpError::Resolve(_))
        ));
        assert_eq!(
            hosts_lookup("ci-gateway", "# c\n10.42.0.1 ci-gateway gw\n"),
            Some("10.42.0.1".parse().unwrap())
        );
    }

    #[test]
    fn responses() {
        let r = parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}xx").unwrap();
        assert_eq!((r.status, r.body.as_slice()), (201, &b"{}"[..]));
        let r = parse_response(
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"er\r\n15\r\nror\":\"x\",\"field\":\"t\"}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.error_message(), "x (field t)");
        assert!(parse_response(b"garbage").is_none());
    }
}
