//! Per-machine console logs: every byte of DUT output, line by line with a UTC timestamp,
//! in size-rotated files, readable from a byte offset or a point in time.
//!
//! Layout: `<dir>/console-<offset>.log`, where `<offset>` (20 digits) is the position of the
//! file's first byte in the machine's whole log. Offsets therefore stay valid across rotations:
//! a reader polls with the `end` of its previous read and never sees a byte twice or misses
//! one that is still kept.
//!
//! Each line starts with `2026-11-22T12:00:00.123456Z ` (fixed width, the time its first byte
//! arrived), followed by the bytes exactly as the DUT sent them (`\r` included). A line is
//! written as soon as its bytes arrive, so a prompt without a newline is visible at once.
//!
//! Writing happens on its own task per machine: the console relay hands chunks over and never
//! waits for the disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::config::ConsoleLogConfig;

/// Width of the timestamp prefix, separator included.
pub const STAMP_LEN: usize = 28;
/// Chunks waiting for the disk beyond this are dropped (and counted): a stuck disk must not
/// grow salad's memory without bound.
const MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;
/// A line that never ends forces a rotation this far past `max_file_bytes`.
const FORCED_ROTATION_SLACK: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("console log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Formats the line prefix for `t` (always UTC, microseconds, fixed width).
pub fn stamp(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z ",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// Where a read starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// A byte offset in the machine's whole log (as returned in `end` by a previous read).
    Offset(u64),
    /// The first line stamped at or after this time.
    Time(OffsetDateTime),
}

impl Since {
    /// `12345` is an offset; anything else must be an RFC 3339 time.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(Since::Offset)
                .map_err(|_| format!("offset {s:?} is too large"));
        }
        OffsetDateTime::parse(s, &Rfc3339)
            .map(Since::Time)
            .map_err(|e| {
                format!("expected a byte offset or an RFC 3339 time like 2026-11-22T12:00:00Z: {e}")
            })
    }
}

/// The bytes a read returned and where they sit in the whole log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSlice {
    /// Offset of the first byte of `data`.
    pub start: u64,
    /// Offset just past `data`: pass it as `since` to continue.
    pub end: u64,
    pub data: Vec<u8>,
}

fn file_name(offset: u64) -> String {
    format!("console-{offset:020}.log")
}

fn parse_file_name(name: &str) -> Option<u64> {
    name.strip_prefix("console-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// The log files of a machine, oldest first: (start offset, path).
async fn list_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, LogError> {
    let mut out = Vec::new();
    let mut rd = match tokio::fs::read_dir(dir).await {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dir)(e)),
    };
    while let Some(entry) = rd.next_entry().await.map_err(io_err(dir))? {
        if let Some(off) = entry.file_name().to_str().and_then(parse_file_name) {
            out.push((off, entry.path()));
        }
    }
    out.sort_unstable_by_key(|(o, _)| *o);
    Ok(out)
}

/// The sending side of a machine's log writer.
#[derive(Clone)]
pub struct ConsoleLog {
    tx: mpsc::UnboundedSender<(OffsetDateTime, Bytes)>,
    pending: Arc<AtomicUsize>,
    end: Arc<AtomicU64>,
    dropped: metrics::Counter,
}

impl ConsoleLog {
    /// Opens (or continues) the log in `dir` and starts its writer task. The task ends when
    /// every `ConsoleLog` clone is dropped, after writing what it was given.
    pub async fn open(
        dir: PathBuf,
        config: ConsoleLogConfig,
        machine: &str,
        tasks: &tokio_util::task::TaskTracker,
    ) -> Result<Self, LogError> {
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io_err(&dir))?;
        let files = list_files(&dir).await?;
        let (start, path) = match files.last() {
            Some((off, p)) => (*off, p.clone()),
            None => (0, dir.join(file_name(0))),
        };
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .await
            .map_err(io_err(&path))?;
        let len = file.metadata().await.map_err(io_err(&path))?.len();
        let at_line_start = if len == 0 {
            true
        } else {
            let mut last = [0u8; 1];
            file.seek(std::io::SeekFrom::Start(len - 1))
                .await
                .map_err(io_err(&path))?;
            file.read_exact(&mut last).await.map_err(io_err(&path))?;
            last[0] == b'\n'
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let end = Arc::new(AtomicU64::new(start + len));
        let writer = Writer {
            dir,
            config,
            file,
            path,
            file_start: start,
            file_len: len,
            at_line_start,
            pending: pending.clone(),
            end: end.clone(),
            machine: machine.to_string(),
        };
        tasks.spawn(writer.run(rx));
        Ok(Self {
            tx,
            pending,
            end,
            dropped: metrics::counter!("salad_console_log_dropped_bytes_total", "machine" => machine.to_string()),
        })
    }

    /// Hands `chunk` (received at `at`) to the writer; never waits.
    pub fn append(&self, at: OffsetDateTime, chunk: Bytes) {
        let n = chunk.len();
        if self.pending.load(Ordering::Relaxed) + n > MAX_PENDING_BYTES {
            self.dropped.increment(n as u64);
            return;
        }
        self.pending.fetch_add(n, Ordering::Relaxed);
        if self.tx.send((at, chunk)).is_err() {
            self.pending.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// Offset just past the last byte written to disk.
    pub fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }
}

struct Writer {
    dir: PathBuf,
    config: ConsoleLogConfig,
    file: tokio::fs::File,
    path: PathBuf,
    file_start: u64,
    file_len: u64,
    at_line_start: bool,
    pending: Arc<AtomicUsize>,
    end: Arc<AtomicU64>,
    machine: String,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<(OffsetDateTime, Bytes)>) {
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut failing = false;
        while let Some(first) = rx.recv().await {
            buf.clear();
            let mut taken = 0;
            let mut item = Some(first);
            // Batch whatever is already queued into one write.
            while let Some((at, chunk)) = item.take() {
                taken += chunk.len();
                self.format(at, &chunk, &mut buf);
                if buf.len() < self.batch_limit() {
                    item = rx.try_recv().ok();
                }
            }
            self.pending.fetch_sub(taken, Ordering::Relaxed);
            match self.write(&buf).await {
                Ok(()) => failing = false,
                Err(e) => {
                    // Logged once per failure streak: a full disk must not flood the log.
                    if !failing {
                        tracing::error!(machine = %self.machine, error = %e, "cannot write the console log");
                    }
                    failing = true;
                }
            }
        }
        let _ = self.file.flush().await;
    }

    /// Bytes gathered into one write: large enough for throughput, small enough that a
    /// file overshoots `max_file_bytes` by little before it rotates.
    fn batch_limit(&self) -> usize {
        (self.config.max_file_bytes / 4).clamp(1024, 1024 * 1024) as usize
    }

    fn format(&mut self, at: OffsetDateTime, chunk: &[u8], out: &mut Vec<u8>) {
        let mut prefix: Option<String> = None;
        let mut rest = chunk;
        while !rest.is_empty() {
            if self.at_line_start {
                let p = prefix.get_or_insert_with(|| stamp(at));
                out.extend_from_slice(p.as_bytes());
                self.at_line_start = false;
            }
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    out.extend_from_slice(&rest[..=i]);
                    rest = &rest[i + 1..];
                    self.at_line_start = true;
                }
                None => {
                    out.extend_from_slice(rest);
                    rest = &[];
                }
            }
        }
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), LogError> {
        self.file
            .write_all(data)
            .await
            .map_err(io_err(&self.path))?;
        self.file.flush().await.map_err(io_err(&self.path))?;
        self.file_len += data.len() as u64;
        self.end
            .store(self.file_start + self.file_len, Ordering::Release);
        let max = self.config.max_file_bytes;
        if (self.file_len >= max && self.at_line_start)
            || self.file_len >= max + FORCED_ROTATION_SLACK
        {
            self.rotate().await?;
        }
        Ok(())
    }

    async fn rotate(&mut self) -> Result<(), LogError> {
        let start = self.file_start + self.file_len;
        let path = self.dir.join(file_name(start));
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .await
            .map_err(io_err(&path))?;
        self.file = file;
        self.path = path;
        self.file_start = start;
        self.file_len = 0;
        // A line cut by a forced rotation gets a fresh stamp in the new file.
        self.at_line_start = true;
        let files = list_files(&self.dir).await?;
        let excess = files.len().saturating_sub(self.config.keep_files + 1);
        for (_, old) in files.into_iter().take(excess) {
            if let Err(e) = tokio::fs::remove_file(&old).await {
                tracing::warn!(machine = %self.machine, path = %old.display(), error = %e, "cannot remove an old console log");
            }
        }
        Ok(())
    }
}

/// Reads at most `limit` bytes of the log in `dir`, starting at `since`. Bytes no longer kept
/// (rotated away) are skipped: `start` then tells where the data really begins.
pub async fn read(dir: &Path, since: &Since, limit: usize) -> Result<LogSlice, LogError> {
    let files = list_files(dir).await?;
    let Some(&(first_start, _)) = files.first() else {
        return Ok(LogSlice {
            start: 0,
            end: 0,
            data: Vec::new(),
        });
    };
    // File lengths are read now; bytes appended while we read are picked up by the next poll.
    let mut spans = Vec::with_capacity(files.len());
    for (start, path) in &files {
        let len = match tokio::fs::metadata(path).await {
            Ok(m) => m.len(),
            // Rotated away between the listing and now.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(path)(e)),
        };
        spans.push((*start, len, path.clone()));
    }
    let total_end = spans.last().map(|(s, l, _)| s + l).unwrap_or(first_start);
    let begin = match since {
        Since::Offset(o) => (*o).clamp(first_start, total_end),
        Since::Time(t) => find_time(&spans, &stamp(*t), total_end).await?,
    };
    let mut data = Vec::new();
    let mut pos = begin;
    for (start, len, path) in &spans {
        if data.len() >= limit {
            break;
        }
        let file_end = start + len;
        if pos >= file_end {
            continue;
        }
        let mut f = match tokio::fs::File::open(path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(path)(e)),
        };
        pos = pos.max(*start);
        f.seek(std::io::SeekFrom::Start(pos - start))
            .await
            .map_err(io_err(path))?;
        let want = ((file_end - pos) as usize).min(limit - data.len());
        let before = data.len();
        f.take(want as u64)
            .read_to_end(&mut data)
            .await
            .map_err(io_err(path))?;
        pos += (data.len() - before) as u64;
    }
    Ok(LogSlice {
        start: begin,
        end: pos.max(begin),
        data,
    })
}

/// Offset of the first line stamped at or after `target` (a [`stamp`]; fixed-width UTC
/// stamps compare correctly as bytes).
async fn find_time(
    spans: &[(u64, u64, PathBuf)],
    target: &str,
    total_end: u64,
) -> Result<u64, LogError> {
    let target = target.trim_end().as_bytes();
    for (start, len, path) in spans {
        let f = match tokio::fs::File::open(path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(path)(e)),
        };
        let mut reader = tokio::io::BufReader::new(f.take(*len));
        let mut line = Vec::new();
        let mut pos = *start;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .await
                .map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            if line.len() >= STAMP_LEN - 1 && &line[..STAMP_LEN - 1] >= target {
                return Ok(pos);
            }
            pos += n as u64;
        }
    }
    Ok(total_end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    async fn open(
        dir: &Path,
        max: u64,
        keep: usize,
    ) -> (ConsoleLog, tokio_util::task::TaskTracker) {
        let tasks = tokio_util::task::TaskTracker::new();
        let log = ConsoleLog::open(
            dir.to_path_buf(),
            ConsoleLogConfig {
                max_file_bytes: max,
                keep_files: keep,
            },
            "test",
            &tasks,
        )
        .await
        .unwrap();
        (log, tasks)
    }

    async fn settle(log: ConsoleLog, tasks: tokio_util::task::TaskTracker) {
        drop(log);
        tasks.close();
        tasks.wait().await;
    }

    #[test]
    fn stamps_are_fixed_width_utc() {
        let s = stamp(datetime!(2026-11-22 12:00:01.000042 +02:00));
        assert_eq!(s, "2026-11-22T10:00:01.000042Z ");
        assert_eq!(s.len(), STAMP_LEN);
    }

    #[test]
    fn since_parses_offsets_and_times() {
        assert_eq!(Since::parse("42").unwrap(), Since::Offset(42));
        assert_eq!(
            Since::parse("2026-11-22T12:00:00Z").unwrap(),
            Since::Time(datetime!(2026-11-22 12:00:00 UTC))
        );
        assert!(Since::parse("yesterday").is_err());
        assert!(Since::parse("99999999999999999999999").is_err());
    }

    #[tokio::test]
    async fn lines_are_stamped_and_partial_lines_continue() {
        let dir = tempfile::tempdir().unwrap();
        let (log, tasks) = open(dir.path(), 1 << 20, 2).await;
        let t1 = datetime!(2026-11-22 12:00:00 UTC);
        let t2 = datetime!(2026-11-22 12:00:05 UTC);
        log.append(t1, Bytes::from_static(b"login: "));
        log.append(t2, Bytes::from_static(b"root\r\nok\n"));
        settle(log, tasks).await;
        let all = read(dir.path(), &Since::Offset(0), 1 << 20).await.unwrap();
        let text = String::from_utf8(all.data).unwrap();
        assert_eq!(
            text,
            "2026-11-22T12:00:00.000000Z login: root\r\n2026-11-22T12:00:05.000000Z ok\n"
        );
        assert_eq!(all.end, text.len() as u64);
        let later = read(
            dir.path(),
            &Since::Time(datetime!(2026-11-22 12:00:03 UTC)),
            1 << 20,
        )
        .await
        .unwrap();
        assert_eq!(later.data, b"2026-11-22T12:00:05.000000Z ok\n");
        assert_eq!(later.end, all.end);
        let nothing = read(dir.path(), &Since::Offset(all.end), 1 << 20)
            .await
            .unwrap();
        assert!(nothing.data.is_empty());
        assert_eq!(nothing.start, all.end);
    }

    #[tokio::test]
    async fn rotation_keeps_offsets_and_drops_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let (log, tasks) = open(dir.path(), 4096, 2).await;
        let t = datetime!(2026-11-22 12:00:00 UTC);
        for i in 0..400u32 {
            log.append(t, Bytes::from(format!("line {i:05} {}\n", "x".repeat(40))));
        }
        settle(log, tasks).await;
        let files = list_files(dir.path()).await.unwrap();
        assert_eq!(files.len(), 3, "current + 2 kept");
        let all = read(dir.path(), &Since::Offset(0), usize::MAX)
            .await
            .unwrap();
        assert_eq!(all.start, files[0].0, "old bytes are gone; start says so");
        let text = String::from_utf8(all.data.clone()).unwrap();
        assert!(text.ends_with(&format!("line 00399 {}\n", "x".repeat(40))));
        // Every kept line is whole and stamped: rotation happened at line starts.
        for line in text.lines() {
            assert!(
                line.starts_with("2026-11-22T12:00:00.000000Z line "),
                "{line}"
            );
        }
        // Reading in small pieces gives the same bytes.
        let mut pos = 0;
        let mut pieces = Vec::new();
        loop {
            let s = read(dir.path(), &Since::Offset(pos), 1000).await.unwrap();
            if s.data.is_empty() {
                break;
            }
            pieces.extend_from_slice(&s.data);
            pos = s.end;
        }
        assert_eq!(pieces, all.data);
        // Reopening continues at the same offset.
        let (log, tasks) = open(dir.path(), 4096, 2).await;
        assert_eq!(log.end(), all.end);
        settle(log, tasks).await;
    }
}
