//! `cargo xtask ui-assets`: refreshes the dashboard's third-party browser files.
//!
//! `npm ci` installs exactly what `services/executor/ui/package-lock.json` pins, in a copy
//! of that directory under `target/` (no `node_modules` in the source tree), and the built
//! files are copied into `services/executor/ui/assets/`, which is committed: `cargo build`
//! embeds them and never runs npm.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// `(file in the npm package dir, name in assets/)`.
const FILES: &[(&str, &str)] = &[
    ("node_modules/@xterm/xterm/lib/xterm.js", "xterm.js"),
    ("node_modules/@xterm/xterm/css/xterm.css", "xterm.css"),
    ("node_modules/@xterm/xterm/LICENSE", "xterm.LICENSE"),
];

pub fn run(root: &Path) -> Result<()> {
    let ui = root.join("services/executor/ui");
    let work = root.join("target/ui-assets");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    for f in ["package.json", "package-lock.json"] {
        std::fs::copy(ui.join(f), work.join(f))
            .with_context(|| format!("copying {}", ui.join(f).display()))?;
    }
    let status = Command::new("npm")
        .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
        .current_dir(&work)
        .status()
        .context("running npm (Debian package `npm`)")?;
    if !status.success() {
        bail!("npm ci in {} failed: {status}", work.display());
    }
    let assets = ui.join("assets");
    std::fs::create_dir_all(&assets)?;
    for (from, to) in FILES {
        let src = work.join(from);
        // The source map comment points at a file the gateway does not serve.
        let text = std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
        let text = strip_source_map(&text);
        std::fs::write(assets.join(to), text)
            .with_context(|| format!("writing {}", assets.join(to).display()))?;
        println!("ui-assets: {to}");
    }
    Ok(())
}

fn strip_source_map(bytes: &[u8]) -> Vec<u8> {
    const MARK: &[u8] = b"\n//# sourceMappingURL=";
    match bytes.windows(MARK.len()).rposition(|w| w == MARK) {
        Some(i) => {
            let mut out = bytes[..i].to_vec();
            out.push(b'\n');
            out
        }
        None => bytes.to_vec(),
    }
}
