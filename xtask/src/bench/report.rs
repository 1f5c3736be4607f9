//! Shared reporting for benchmarks: summary statistics, and dated Markdown tables appended to
//! `docs/benchmarks.md`, each naming the command that produced it and the machine it ran on.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// min / median / max / p99 of a sample set (any unit).
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stats(samples: &[f64]) -> Option<Stats> {
    if samples.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| v[(((v.len() - 1) as f64) * p).round() as usize];
    Some(Stats {
        min: v[0],
        median: pct(0.5),
        p99: pct(0.99),
        max: v[v.len() - 1],
        n: v.len(),
    })
}

/// One line describing the machine: CPU model, cores, memory, kernel.
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem_gib:.0} GiB RAM, Linux {kernel}")
}

/// The 1-minute load average, as text ("unknown" when /proc has none): other work on the
/// machine shows in every figure, so each run records how busy the machine was.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

fn now_utc() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02} UTC",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute()
    )
}

/// Appends one dated paragraph to docs/benchmarks.md (e.g. how long `bench all` took).
pub fn append_line(root: &Path, text: &str) -> anyhow::Result<()> {
    let path = root.join("docs/benchmarks.md");
    let out = format!("\n{text} ({})\n", now_utc());
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(out.as_bytes())?;
    println!("{out}");
    Ok(())
}

/// Appends a section to docs/benchmarks.md: title, date, machine, command, table, notes.
pub fn append_table(
    root: &Path,
    title: &str,
    command: &str,
    header: &[&str],
    rows: &[Vec<String>],
    notes: &str,
) -> anyhow::Result<()> {
    let path = root.join("docs/benchmarks.md");
    let date = now_utc();
    let mut out = String::new();
    out.push_str(&format!("\n## {title} ({date})\n\n"));
    out.push_str(&format!(
        "Command: `{command}`  \nMachine: {}\n\n",
        machine_description()
    ));
    out.push_str(&format!("| {} |\n", header.join(" | ")));
    out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
    for row in rows {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    if !notes.is_empty() {
        out.push_str(&format!("\n{notes}\n"));
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(out.as_bytes())?;
    println!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_samples() {
        let s = stats(&[3.0, 1.0, 2.0, 100.0]).unwrap();
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 100.0);
        assert_eq!(s.n, 4);
        assert!(stats(&[]).is_none());
    }
}
