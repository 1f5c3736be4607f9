//! `cargo xtask bench dashboard`'s measuring program (example `dashboard_bench`): a farm of
//! simulated machines (dummy PDU, no QEMU, no DUT processes: admitted `IDLE`), its executor's
//! dashboard loaded in Debian's chromium by `ui/browser/bench.mjs` (playwright-core from npm,
//! installed under target/ from the committed lock file). Prints `ROW\t<figure>\t<value>`.
//! `--quick`: 20 machines, 2 loads, limits not enforced (a smoke run beside the tests).

use std::path::PathBuf;
use std::process::Command;

use dutgate_core::testing::{require_program, run_ok, target_dir};
use dutgate_executor::testing::{ADMIN, Farm, Options, mac};

fn browser_tools() -> PathBuf {
    require_program("node", "nodejs");
    require_program("npm", "npm");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ui/browser");
    let dir = target_dir().join("dashboard-browser");
    std::fs::create_dir_all(&dir).expect("target/dashboard-browser");
    let lock = std::fs::read(src.join("package-lock.json")).expect("ui/browser/package-lock.json");
    let marker = dir.join(".installed-lock");
    if std::fs::read(&marker).ok().as_deref() != Some(&lock[..])
        || !dir.join("node_modules/playwright-core").is_dir()
    {
        for f in ["package.json", "package-lock.json"] {
            std::fs::copy(src.join(f), dir.join(f)).expect("copying the npm manifest");
        }
        run_ok(
            Command::new("npm")
                .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
                .current_dir(&dir),
            "npm ci (npm package playwright-core)",
        );
        std::fs::write(&marker, &lock).expect("the install marker");
    }
    std::fs::copy(src.join("bench.mjs"), dir.join("bench.mjs")).expect("copying bench.mjs");
    dir
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let quick = std::env::args().any(|a| a == "--quick");
    let chromium = require_program("chromium", "chromium");
    let tools = browser_tools();
    let machines: u16 = if quick { 20 } else { 200 };
    let farm = Farm::start(Options {
        machines,
        sims: false,
        ..Default::default()
    })
    .await;
    let out = tokio::process::Command::new("node")
        .arg(tools.join("bench.mjs"))
        .current_dir(&tools)
        .env("DASH_URL", &farm.url)
        .env("DASH_ADMIN", ADMIN)
        .env("DASH_MARS", &farm.mars_url)
        .env("DASH_RETIRE", mac(machines / 2).to_string())
        .env("DASH_LOADS", if quick { "2" } else { "5" })
        .env("DASH_LIMITS", if quick { "0" } else { "1" })
        .env("CHROMIUM", &chromium)
        .output()
        .await
        .expect("node runs");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    farm.stop().await;
    if out.status.success() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
