//! CPU time and memory of this process and of the job processes it started, from /proc.

use std::collections::HashMap;

/// Clock ticks per second of /proc/<pid>/stat times.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// (ppid, utime + stime, cutime + cstime) in seconds, from `/proc/<pid>/stat`.
pub fn stat_of(path: &str, tps: f64) -> Option<(u32, f64, f64)> {
    let text = std::fs::read_to_string(path).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    Some((
        f.get(1)?.parse().ok()?,
        (num(11)? + num(12)?) / tps,
        (num(13)? + num(14)?) / tps,
    ))
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Every live process below `root` (children, grandchildren, …).
pub fn descendants(root: u32) -> Vec<u32> {
    let tps = ticks_per_second();
    let mut parent: HashMap<u32, u32> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, _, _)) = stat_of(&format!("/proc/{pid}/stat"), tps) {
                parent.insert(pid, ppid);
            }
        }
    }
    let mut out = Vec::new();
    for &pid in parent.keys() {
        let mut p = pid;
        // Walk up (bounded: pid reuse could make a cycle in a racy snapshot).
        for _ in 0..64 {
            match parent.get(&p) {
                Some(&pp) if pp == root => {
                    out.push(pid);
                    break;
                }
                Some(&pp) if pp > 1 => p = pp,
                _ => break,
            }
        }
    }
    out
}

/// CPU seconds used so far by this process (all threads, minus the benchmark's own threads),
/// by the executor processes and by every job process (finished ones through the cutime and
/// cstime of the process that reaped them, live ones directly).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    /// This process, every thread.
    pub process: f64,
    /// Threads of the benchmark itself (simulated DUTs, submitter, sampler): named `bench-*`.
    pub bench_threads: f64,
    /// Executor processes (their own threads).
    pub executors: f64,
    /// Job processes, finished and live.
    pub jobs: f64,
}

impl Cpu {
    pub fn gateway(&self) -> f64 {
        self.process - self.bench_threads + self.executors + self.jobs
    }
}

pub fn cpu_now(executor_pids: &[u32]) -> Cpu {
    let tps = ticks_per_second();
    let me = std::process::id();
    let (_, process, reaped) = stat_of("/proc/self/stat", tps).unwrap_or_default();
    let mut bench_threads = 0.0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let dir = t.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.starts_with("bench-")
                && let Some((_, cpu, _)) = stat_of(&dir.join("stat").to_string_lossy(), tps)
            {
                bench_threads += cpu;
            }
        }
    }
    let (mut executors, mut jobs) = (0.0, reaped);
    for pid in descendants(me) {
        let Some((_, own, reaped)) = stat_of(&format!("/proc/{pid}/stat"), tps) else {
            continue;
        };
        if executor_pids.contains(&pid) {
            executors += own;
        } else {
            jobs += own;
        }
        jobs += reaped;
    }
    Cpu {
        process,
        bench_threads,
        executors,
        jobs,
    }
}

/// One memory sample: this process and its job processes.
#[derive(Debug, Clone, Default)]
pub struct Mem {
    pub process_kib: u64,
    /// (pid, VmRSS KiB) of every process below this one.
    pub children: Vec<(u32, u64)>,
}

pub fn mem_now() -> Mem {
    let me = std::process::id();
    Mem {
        process_kib: status_kib(me, "VmRSS:").unwrap_or(0),
        children: descendants(me)
            .into_iter()
            .filter_map(|pid| Some((pid, status_kib(pid, "VmRSS:")?)))
            .collect(),
    }
}

/// The RSS of process `pid`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// The peak RSS of this process (VmHWM).
pub fn process_peak_kib() -> u64 {
    status_kib(std::process::id(), "VmHWM:").unwrap_or(0)
}
