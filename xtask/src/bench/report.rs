//! Shared reporting for benchmarks: summary statistics, and dated Markdown tables written to
//! `docs/benchmarks.md` (the latest run of each benchmark; older runs in
//! `docs/benchmarks-history.md`), each naming the command that produced it and the machine.

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

const LATEST: &str = "docs/benchmarks.md";
const HISTORY: &str = "docs/benchmarks-history.md";
const HISTORY_HEADER: &str = "# Benchmark history\n\nEarlier runs of each benchmark, newest first: \
`cargo xtask bench` moves a benchmark's section here from [benchmarks.md](benchmarks.md) when a \
new run replaces it.\n";

/// Writes one benchmark's section to docs/benchmarks.md: title, date, machine, command, table,
/// notes. The section replaces the one with the same title (so the page shows the latest run of
/// each benchmark, what a reader wants); the replaced one moves to docs/benchmarks-history.md.
pub fn append_table(
    root: &Path,
    title: &str,
    command: &str,
    header: &[&str],
    rows: &[Vec<String>],
    notes: &str,
) -> anyhow::Result<()> {
    let mut out = String::new();
    out.push_str(&format!("## {title} ({})\n\n", now_utc()));
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
    println!("{out}");
    replace_section(root, title, &out)
}

/// Writes a one-paragraph section (e.g. how long `bench all` took), replacing the previous
/// one with the same title like [`append_table`].
pub fn append_line(root: &Path, title: &str, text: &str) -> anyhow::Result<()> {
    let out = format!("## {title} ({})\n\n{text}\n", now_utc());
    println!("{out}");
    replace_section(root, title, &out)
}

fn replace_section(root: &Path, title: &str, section: &str) -> anyhow::Result<()> {
    let latest_path = root.join(LATEST);
    let history_path = root.join(HISTORY);
    let latest = read_or_empty(&latest_path)?;
    let history = read_or_empty(&history_path)?;
    let (latest, history) = replaced(&latest, &history, title, section);
    write_atomically(&history_path, &history)?;
    write_atomically(&latest_path, &latest)
}

fn read_or_empty(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("md.tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// A page split at its `## ` headings: the text before the first one, then each section
/// (heading line included).
fn sections(page: &str) -> (String, Vec<String>) {
    let mut preamble = String::new();
    let mut out: Vec<String> = Vec::new();
    for line in page.split_inclusive('\n') {
        if line.starts_with("## ") {
            out.push(String::new());
        }
        match out.last_mut() {
            Some(s) => s.push_str(line),
            None => preamble.push_str(line),
        }
    }
    (preamble, out)
}

/// A section's title: its heading without the trailing ` (YYYY-MM-DD HH:MM UTC)`.
fn title_of(section: &str) -> &str {
    let heading = section.lines().next().unwrap_or("");
    let heading = heading.strip_prefix("## ").unwrap_or(heading).trim_end();
    match heading.rsplit_once(" (") {
        Some((title, date)) if date.ends_with(" UTC)") && date.starts_with("20") => title,
        _ => heading,
    }
}

fn joined(preamble: &str, sections: &[String]) -> String {
    let mut page = preamble.to_string();
    for s in sections {
        if !page.is_empty() && !page.ends_with("\n\n") {
            page.push('\n');
        }
        page.push_str(s.trim_end());
        page.push('\n');
    }
    page
}

/// `(latest page, history page)` once `section` replaces every section titled `title`: it
/// takes the place of the first of them (or goes last), and they go to the top of the
/// history, newest first.
fn replaced(latest: &str, history: &str, title: &str, section: &str) -> (String, String) {
    let (preamble, old) = sections(latest);
    let mut kept: Vec<String> = Vec::new();
    let mut moved: Vec<String> = Vec::new();
    let mut placed = false;
    for s in old {
        if title_of(&s) == title {
            if !placed {
                kept.push(section.to_string());
                placed = true;
            }
            moved.push(s);
        } else {
            kept.push(s);
        }
    }
    if !placed {
        kept.push(section.to_string());
    }
    let (hist_preamble, mut hist) = sections(history);
    let hist_preamble = if hist_preamble.trim().is_empty() {
        HISTORY_HEADER.to_string()
    } else {
        hist_preamble
    };
    moved.reverse();
    moved.append(&mut hist);
    (joined(&preamble, &kept), joined(&hist_preamble, &moved))
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

    const OLD: &str = "# Benchmarks\n\nIntro.\n\n## A (2026-01-01 10:00 UTC)\n\nold a\n\n\
                       ## Notes\n\nstatic\n\n## B (2026-01-01 11:00 UTC)\n\nold b\n";

    #[test]
    fn a_run_replaces_its_section_and_moves_the_old_one_to_the_history() {
        let (latest, history) = replaced(OLD, "", "A", "## A (2026-02-02 10:00 UTC)\n\nnew a\n");
        assert_eq!(
            latest,
            "# Benchmarks\n\nIntro.\n\n## A (2026-02-02 10:00 UTC)\n\nnew a\n\n## Notes\n\n\
             static\n\n## B (2026-01-01 11:00 UTC)\n\nold b\n"
        );
        assert!(history.starts_with(HISTORY_HEADER), "{history}");
        assert!(
            history.ends_with("\n## A (2026-01-01 10:00 UTC)\n\nold a\n"),
            "{history}"
        );

        // The next run of A: its previous section goes above the older one.
        let (latest, history) = replaced(
            &latest,
            &history,
            "A",
            "## A (2026-03-03 10:00 UTC)\n\nnewer a\n",
        );
        assert!(latest.contains("newer a") && !latest.contains("new a\n"));
        let newer = history.find("2026-02-02").unwrap();
        let older = history.find("2026-01-01").unwrap();
        assert!(newer < older, "{history}");
        // A section without a date is never taken for a run.
        assert!(latest.contains("## Notes\n\nstatic"));
    }

    #[test]
    fn a_new_benchmark_goes_last() {
        let (latest, history) = replaced(OLD, "", "C", "## C (2026-02-02 10:00 UTC)\n\nc\n");
        assert!(
            latest.ends_with("old b\n\n## C (2026-02-02 10:00 UTC)\n\nc\n"),
            "{latest}"
        );
        assert_eq!(history, HISTORY_HEADER);
        assert_eq!(
            title_of("## Gateway footprint (2026-11-22 16:37 UTC)"),
            "Gateway footprint"
        );
        assert_eq!(
            title_of("## Farm: what the figures mean"),
            "Farm: what the figures mean"
        );
    }
}
