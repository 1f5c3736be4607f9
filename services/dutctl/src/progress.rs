//! What `dutctl` says on stderr while it works: timestamped lines, and on long waits
//! (a queued job, an upload, artifact downloads, `machines discover --wait`) a spinner or a
//! bar when stderr is a terminal, one plain line otherwise (CI logs get no control codes).
//! Nothing here ever writes to stdout, which holds the console or the `-o json|yaml` document.

use std::io::IsTerminal as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    start: Instant,
    /// stderr is a terminal: spinners and bars are drawn.
    live: bool,
    /// The spinner or bar shown now; lines are printed above it.
    current: Mutex<Option<ProgressBar>>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            live: std::io::stderr().is_terminal(),
            current: Mutex::new(None),
        }
    }

    fn stamp(&self, msg: &str) -> String {
        let s = self.start.elapsed().as_secs_f64();
        format!("[{s:7.1}s] {msg}")
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<ProgressBar>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A line on stderr, above the spinner if one is shown.
    pub fn line(&self, msg: &str) {
        let text = self.stamp(msg);
        match self.current().as_ref() {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// A wait of unknown length: a spinner saying `msg` on a terminal (replacing the shown
    /// one), else the line once.
    pub fn spin(&self, msg: &str) {
        if !self.live {
            self.line(msg);
            return;
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed:>4}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(msg.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        if let Some(old) = self.current().replace(bar) {
            old.finish_and_clear();
        }
    }

    /// A wait of known length (`len` items or bytes): a bar on a terminal, nothing
    /// otherwise (the caller prints the outcome). Advanced with [`Progress::advance`].
    pub fn bar(&self, len: u64, bytes: bool, msg: &str) {
        if !self.live {
            return;
        }
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
        let template = if bytes {
            "{bar:30} {bytes}/{total_bytes} {msg}"
        } else {
            "{bar:30} {pos}/{len} {msg}"
        };
        bar.set_style(
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(msg.to_string());
        if let Some(old) = self.current().replace(bar) {
            old.finish_and_clear();
        }
    }

    /// Moves the bar by `n` and names what is being done.
    pub fn advance(&self, n: u64, msg: &str) {
        if let Some(bar) = self.current().as_ref() {
            bar.inc(n);
            bar.set_message(msg.to_string());
        }
    }

    /// The wait is over: the spinner or bar goes away.
    pub fn done(&self) {
        if let Some(bar) = self.current().take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done();
    }
}
