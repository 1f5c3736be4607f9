//! One refused request and what must come of it: the status, a reason in the body (JSON
//! `error` or S3 XML `<Message>`), and a gateway log line naming where it came from.

use std::net::IpAddr;

use dutgate_e2e::raw_http::{RawRequest, RawResponse};

/// The kind of answer a refusal carries.
#[derive(Debug, Clone)]
pub enum Reason {
    /// `{"error": "…"}`.
    Json,
    /// An S3 XML error with this `<Code>`.
    S3(&'static str),
    /// Any body (a script, an object).
    Text,
}

/// What a request must get back.
#[derive(Debug, Clone)]
pub struct Expect {
    pub status: u16,
    pub reason: Reason,
    /// Fragments the reason (the JSON error, the S3 error body, the text) must hold.
    pub says: Vec<String>,
    /// Fragments the answer must not hold (a secret, the victim's data).
    pub lacks: Vec<String>,
    /// The gateway log line the request must leave: one that names the source address, is
    /// written by the service the request went to, and holds every fragment of one of these
    /// sets. Empty: no line is looked for (a request that is not refused).
    pub log: Vec<Vec<String>>,
}

fn strings(fragments: &[&str]) -> Vec<String> {
    fragments.iter().map(|f| f.to_string()).collect()
}

impl Expect {
    fn new(status: u16, reason: Reason, says: &[&str]) -> Self {
        Self {
            status,
            reason,
            says: strings(says),
            lacks: Vec::new(),
            log: Vec::new(),
        }
    }

    pub fn json(status: u16, says: &[&str]) -> Self {
        Self::new(status, Reason::Json, says)
    }

    pub fn s3(status: u16, code: &'static str, says: &[&str]) -> Self {
        Self::new(status, Reason::S3(code), says)
    }

    pub fn text(status: u16, says: &[&str]) -> Self {
        Self::new(status, Reason::Text, says)
    }

    pub fn logged(mut self, fragments: &[&str]) -> Self {
        self.log.push(strings(fragments));
        self
    }

    /// Logged as refused, by the handler or the audit log (a line that gives the reason
    /// the answer gives), or by the service's HTTP layer (a line with the status) for the
    /// requests no handler sees: a malformed or oversized body, a malformed id.
    pub fn logged_refusal(mut self) -> Self {
        if !self.says.is_empty() {
            self.log.push(self.says.clone());
        }
        let status = format!("status={}", self.status);
        self.logged(&["refused", &status])
    }

    /// A made-up id: logged as not found with its status.
    pub fn logged_not_found(self) -> Self {
        let status = format!("status={}", self.status);
        self.logged(&["not found", &status])
    }

    pub fn lacking(mut self, fragments: &[&str]) -> Self {
        self.lacks.extend(strings(fragments));
        self
    }
}

/// A request played against the gateway, from a known address.
#[derive(Debug, Clone)]
pub struct Case {
    pub what: String,
    /// The gateway port it goes to.
    pub port: u16,
    pub request: RawRequest,
    pub from: IpAddr,
    pub expect: Expect,
}

impl Case {
    /// What is wrong with `answer`, if anything.
    pub fn check(&self, answer: Option<&RawResponse>) -> Result<(), String> {
        let fail = |why: String| {
            Err(format!(
                "{} ({} from {}): {why}",
                self.what,
                self.request.line(),
                self.from
            ))
        };
        let Some(r) = answer else {
            return fail("no answer".into());
        };
        let e = &self.expect;
        if r.status != e.status {
            return fail(format!(
                "status {} instead of {}: {}",
                r.status, e.status, r.body
            ));
        }
        let reason = match e.reason {
            Reason::Json => match r.json_error() {
                Some(error) => error,
                None => return fail(format!("no JSON error body: {:?}", r.body)),
            },
            Reason::S3(code) => {
                if r.s3_code() != Some(code) {
                    return fail(format!("not an S3 {code} error: {:?}", r.body));
                }
                r.body.clone()
            }
            Reason::Text => r.body.clone(),
        };
        if let Some(missing) = e.says.iter().find(|f| !reason.contains(f.as_str())) {
            return fail(format!("the answer does not say {missing:?}: {reason:?}"));
        }
        for bad in &e.lacks {
            if r.body.contains(bad.as_str()) {
                return fail(format!("the answer holds {bad:?}: {:?}", r.body));
            }
        }
        Ok(())
    }

    /// Whether `line` is the log line this case asks for.
    pub fn is_logged_by(&self, line: &str) -> bool {
        line.contains(&format!("{} | ", service(self.port)))
            && names_address(line, self.from)
            && self
                .expect
                .log
                .iter()
                .any(|set| set.iter().all(|f| line.contains(f.as_str())))
    }

    /// How much a line must hold for this case, to let the pickiest cases choose first.
    fn pickiness(&self) -> usize {
        self.expect
            .log
            .iter()
            .map(|set| set.iter().map(String::len).sum::<usize>())
            .min()
            .unwrap_or(0)
    }
}

/// The service behind a gateway port, as `dutgate up` prefixes its lines (`  boot | …`).
pub fn service(port: u16) -> &'static str {
    match port {
        super::EXECUTOR => "executor",
        super::MARS => "mars",
        super::BOOT => "boot",
        super::PDU => "pdu",
        super::SALAD => "salad",
        super::S3 => "s3",
        _ => "?",
    }
}

/// The cases whose log line is not in `log`, each line standing for one case only; the
/// cases that ask the most of a line choose first.
pub fn missing_log_lines<'a>(cases: &[&'a Case], log: &str) -> Vec<&'a Case> {
    let mut lines: Vec<Option<&str>> = log.lines().map(Some).collect();
    let mut wanting: Vec<&'a Case> = cases
        .iter()
        .copied()
        .filter(|c| !c.expect.log.is_empty())
        .collect();
    wanting.sort_by_key(|c| std::cmp::Reverse(c.pickiness()));
    let mut missing = Vec::new();
    for case in wanting {
        match lines
            .iter_mut()
            .find(|l| l.is_some_and(|l| case.is_logged_by(l)))
        {
            Some(line) => *line = None,
            None => missing.push(case),
        }
    }
    missing
}

/// Whether `line` names `ip` as its source (`peer=`, `source=`; 10.77.0.1 is not named by
/// a line whose source is 10.77.0.10, nor by one that only mentions it in its message).
pub fn names_address(line: &str, ip: IpAddr) -> bool {
    let ip = ip.to_string();
    line.match_indices(&ip).any(|(at, _)| {
        let before = &line[..at];
        let after = line[at + ip.len()..].chars().next();
        ["peer=", "source=", "peer=Some(", "source=\"", "peer=\""]
            .iter()
            .any(|field| before.ends_with(field))
            && !after.is_some_and(|c| c.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_matched_whole() {
        let ip: IpAddr = "10.77.0.1".parse().unwrap();
        assert!(names_address("peer=10.77.0.1:4242 x", ip));
        assert!(names_address("peer=Some(10.77.0.1)", ip));
        assert!(names_address("x source=\"10.77.0.1:80\"", ip));
        assert!(!names_address("peer=10.77.0.101", ip));
        assert!(!names_address("peer=110.77.0.1", ip));
        assert!(!names_address(
            "accepted from 10.77.0.1 only peer=10.77.0.2",
            ip
        ));
    }

    #[test]
    fn one_log_line_stands_for_one_case() {
        let case = |log: &[&str]| Case {
            what: "x".into(),
            port: super::super::BOOT,
            request: RawRequest::get("/"),
            from: "10.77.0.1".parse().unwrap(),
            expect: Expect::json(401, &[]).logged(log),
        };
        let (generic, specific) = (case(&["refused"]), case(&["refused", "status=401"]));
        let log =
            " boot | WARN refused status=401 peer=10.77.0.1\n boot | WARN refused peer=10.77.0.1\n";
        assert!(missing_log_lines(&[&generic, &specific], log).is_empty());
        let one = " boot | WARN refused status=401 peer=10.77.0.1\n";
        assert_eq!(missing_log_lines(&[&generic, &specific], one).len(), 1);
        let elsewhere = " mars | WARN refused status=401 peer=10.77.0.1\n";
        assert_eq!(missing_log_lines(&[&specific], elsewhere).len(), 1);
        let other_source = " boot | WARN refused status=401 peer=10.77.0.10\n";
        assert_eq!(missing_log_lines(&[&specific], other_source).len(), 1);
        // Any one set of fragments will do.
        let either = Case {
            expect: Expect::json(400, &["EOF while parsing"]).logged_refusal(),
            ..case(&[])
        };
        let audit = " boot | INFO audit source=10.77.0.1:4 outcome=\"failed: EOF while parsing\"\n";
        assert!(missing_log_lines(&[&either], audit).is_empty());
        let layer = " boot | WARN request refused status=400 peer=10.77.0.1:4\n";
        assert!(missing_log_lines(&[&either], layer).is_empty());
    }
}
