//! Association: which machine a console stream belongs to, learnt from the stream itself.
//!
//! A DUT (or the kernel echoing its cmdline) prints `SALAD.machine_id=<mac>`; the
//! registration agent probes its ports with `SALAD.ping` and expects `SALAD.pong\n` back.
//! [`LineScanner`] splits the raw bytes into lines (`\n`, with an optional `\r` before it) and
//! reports those two markers. It tolerates garbage anywhere in a line (USB adapters emit
//! `\x00`/`\xfc` on power-up) and never fails on any input: it only ever reports events.
//!
//! Invariant: the scanner looks at the bytes, it never changes or holds back what is relayed.

use dutgate_core::MachineId;

/// A line longer than this is not inspected past its first `MAX_LINE` bytes: markers are
/// short and sit in short lines; a DUT flooding without newlines must not grow memory.
pub const MAX_LINE: usize = 4096;

const PING: &[u8] = b"SALAD.ping";
const MACHINE_ID: &[u8] = b"SALAD.machine_id=";

/// What a complete line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Reply `SALAD.pong\n` on the stream.
    Ping,
    /// Bind the stream to this machine. `line_start` is where the announcing line begins in
    /// the chunk just scanned (0 when it began in an earlier chunk): the bytes from there on
    /// belong to the new machine.
    Bind {
        machine: MachineId,
        line_start: usize,
    },
    /// A `SALAD.machine_id=` line whose value (of this many bytes) is not a machine id
    /// (logged, otherwise ignored). The value itself is not kept: it is DUT output, which may
    /// hold a job secret, and it goes to salad's own log.
    BadMachineId(usize),
}

/// Splits a byte stream into lines and reports the association markers they contain.
#[derive(Debug, Default)]
pub struct LineScanner {
    /// The start of the current, unfinished line (at most [`MAX_LINE`] bytes).
    partial: Vec<u8>,
}

impl LineScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of the unfinished line kept (at most [`MAX_LINE`]).
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Scans one chunk, appending the events of every line it completes to `events`.
    pub fn scan(&mut self, chunk: &[u8], events: &mut Vec<Event>) {
        let mut start = 0;
        while let Some(pos) = memchr_newline(&chunk[start..]) {
            let end = start + pos;
            if self.partial.is_empty() {
                inspect(&chunk[start..end], start, events);
            } else {
                let room = MAX_LINE.saturating_sub(self.partial.len());
                let take = (end - start).min(room);
                self.partial.extend_from_slice(&chunk[start..start + take]);
                let line = std::mem::take(&mut self.partial);
                inspect(&line, 0, events);
                self.partial = line;
                self.partial.clear();
            }
            start = end + 1;
        }
        let rest = &chunk[start..];
        let room = MAX_LINE.saturating_sub(self.partial.len());
        self.partial
            .extend_from_slice(&rest[..rest.len().min(room)]);
    }
}

fn memchr_newline(s: &[u8]) -> Option<usize> {
    s.iter().position(|&b| b == b'\n')
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Looks at one complete line (without its `\n`).
fn inspect(line: &[u8], line_start: usize, events: &mut Vec<Event>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    // Cheap filter: nearly every console line has no marker at all.
    if find(line, b"SALAD.").is_none() {
        return;
    }
    if find(line, PING).is_some() {
        events.push(Event::Ping);
    }
    if let Some(at) = find(line, MACHINE_ID) {
        let value = &line[at + MACHINE_ID.len()..];
        let end = value
            .iter()
            .position(|b| b.is_ascii_whitespace())
            .unwrap_or(value.len());
        let text = String::from_utf8_lossy(&value[..end]);
        match MachineId::parse(&text) {
            Ok(machine) => events.push(Event::Bind {
                machine,
                line_start,
            }),
            Err(_) => events.push(Event::BadMachineId(end)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scan_all(chunks: &[&[u8]]) -> Vec<Event> {
        let mut s = LineScanner::new();
        let mut ev = Vec::new();
        for c in chunks {
            s.scan(c, &mut ev);
        }
        ev
    }

    fn mid() -> MachineId {
        MachineId::parse("52:54:00:12:34:56").unwrap()
    }

    #[test]
    fn ping_after_garbage_with_crlf() {
        assert_eq!(scan_all(&[b"\x00\xfcSALAD.ping\r\n"]), vec![Event::Ping]);
    }

    #[test]
    fn ping_needs_a_complete_line() {
        assert_eq!(scan_all(&[b"SALAD.ping"]), vec![]);
        assert_eq!(scan_all(&[b"SALAD.pi", b"ng\n"]), vec![Event::Ping]);
    }

    #[test]
    fn machine_id_in_a_kernel_cmdline() {
        let ev = scan_all(&[
            b"[    0.000000] Command line: console=ttyS0 SALAD.machine_id=52-54-00-12-34-56 quiet\r\n",
        ]);
        assert_eq!(
            ev,
            vec![Event::Bind {
                machine: mid(),
                line_start: 0
            }]
        );
    }

    #[test]
    fn bind_reports_where_the_line_starts() {
        let ev = scan_all(&[b"old output\nSALAD.machine_id=52:54:00:12:34:56\n"]);
        assert_eq!(
            ev,
            vec![Event::Bind {
                machine: mid(),
                line_start: 11
            }]
        );
    }

    #[test]
    fn bad_id_is_reported_not_bound() {
        let ev = scan_all(&[b"SALAD.machine_id=not-a-mac\n"]);
        assert_eq!(ev, vec![Event::BadMachineId(9)]);
    }

    #[test]
    fn overlong_line_is_bounded() {
        let mut s = LineScanner::new();
        let mut ev = Vec::new();
        for _ in 0..100 {
            s.scan(&[b'x'; 1000], &mut ev);
        }
        assert!(s.partial.len() <= MAX_LINE);
        s.scan(b"\nSALAD.ping\n", &mut ev);
        assert_eq!(ev, vec![Event::Ping]);
    }

    proptest! {
        /// However the bytes are cut into chunks, the same events come out, and garbage never
        /// panics.
        #[test]
        fn chunking_does_not_matter(
            garbage in proptest::collection::vec(any::<u8>(), 0..200),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let mut data = garbage.clone();
            data.extend_from_slice(b"SALAD.ping\r\nxx SALAD.machine_id=52:54:00:12:34:56\n");
            let whole = scan_all(&[&data]);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (data.len() + 1)).collect();
            cuts.sort_unstable();
            let mut pieces: Vec<&[u8]> = Vec::new();
            let mut last = 0;
            for c in cuts {
                pieces.push(&data[last..c]);
                last = c;
            }
            pieces.push(&data[last..]);
            let split = scan_all(&pieces);
            let strip = |v: Vec<Event>| -> Vec<Event> {
                v.into_iter().map(|e| match e {
                    Event::Bind { machine, .. } => Event::Bind { machine, line_start: 0 },
                    other => other,
                }).collect()
            };
            prop_assert_eq!(strip(whole.clone()), strip(split));
            prop_assert!(whole.contains(&Event::Ping));
            let bound = whole.iter().any(|e| matches!(e, Event::Bind { machine, .. } if *machine == mid()));
            prop_assert!(bound);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut s = LineScanner::new();
            let mut ev = Vec::new();
            s.scan(&data, &mut ev);
            prop_assert!(s.partial.len() <= MAX_LINE);
        }
    }
}
