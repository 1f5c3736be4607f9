//! The web dashboard in a browser against the virtual farm's QEMU DUTs (docs/dashboard.md):
//! Debian's `chromium`, headless, driven by playwright-core (npm, installed under target/
//! from services/executor/ui/browser/package-lock.json) running
//! services/executor/ui/browser/scenario.mjs.
//!
//! With both machines IDLE: signs in with the admin token and sees them IDLE; a job
//! submitted with `dutctl run` streams its console live into the job page; machine B is
//! retired from the page (the farm page shows it) and activated again; a user token is
//! refused an admin action with mars' reason. Screenshots of the farm, queue and job pages
//! go to target/dashboard-screenshots/ (docs/dashboard/ holds copies). Returns once both
//! machines are IDLE again. About 30–50 s on 2 cores.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dutgate_core::testing::{require_program, run_ok, target_dir};
use dutgate_e2e::farm::{Farm, job_running, root};

/// playwright-core installed from the committed lock file under target/ (once); returns the
/// directory holding `node_modules/`, with the scenario script copied beside it.
pub fn browser_tools() -> PathBuf {
    require_program("node", "nodejs");
    require_program("npm", "npm");
    let src = root().join("services/executor/ui/browser");
    let dir = target_dir().join("dashboard-browser");
    std::fs::create_dir_all(&dir).unwrap();
    let lock = std::fs::read(src.join("package-lock.json")).unwrap();
    let marker = dir.join(".installed-lock");
    if std::fs::read(&marker).ok().as_deref() != Some(&lock[..])
        || !dir.join("node_modules/playwright-core").is_dir()
    {
        for f in ["package.json", "package-lock.json"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        run_ok(
            Command::new("npm")
                .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
                .current_dir(&dir),
            "npm ci (npm package playwright-core, from services/executor/ui/browser/package-lock.json)",
        );
        std::fs::write(&marker, &lock).unwrap();
    }
    for f in ["scenario.mjs", "bench.mjs"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    dir
}

fn token(farm: &Farm, name: &str) -> String {
    let path = farm.state.join("tokens").join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

pub fn dashboard_in_a_browser(farm: &mut Farm, executor_port: u16, machines: [&str; 2]) {
    let t0 = Instant::now();
    let chromium = require_program("chromium", "chromium");
    let tools = browser_tools();
    let shots = target_dir().join("dashboard-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let stderr_log = farm.tmp.join("dashboard.stderr");
    let mut node = Command::new("node")
        .arg(tools.join("scenario.mjs"))
        .current_dir(&tools)
        .env("DASH_URL", format!("http://127.0.0.1:{executor_port}"))
        .env("DASH_ADMIN", token(farm, "admin"))
        .env("DASH_USER", token(farm, "user"))
        .env("DASH_MACHINES", machines.join(","))
        .env("DASH_OUT", &shots)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("node does not start: {e}"));
    let mut stdin = node.stdin.take().unwrap();
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let mut expect = |want: &str, node: &mut std::process::Child| {
        let got = lines.next().and_then(Result::ok).unwrap_or_default();
        if got != want {
            let _ = node.kill();
            let _ = node.wait();
            panic!(
                "dashboard scenario: expected {want:?}, got {got:?}\n{}",
                std::fs::read_to_string(&stderr_log).unwrap_or_default()
            );
        }
    };
    expect("farm-idle", &mut node);

    // A job from the CLI, printing for a few seconds, on machine A.
    let yml = job_running(
        &farm.tmp,
        "dashboard",
        "for i in 1 2 3 4 5 6; do echo dashboard tick $i; sleep 1; done",
    );
    let run = farm.spawn_run("dashboard", &yml, &[], &["-i", machines[0]]);
    let id = farm.wait_for("dashboard job id", Duration::from_secs(30), |_| {
        run.job_id()
    });
    writeln!(stdin, "job {id}").unwrap();
    expect("ok", &mut node);
    // The script exits once its stdin is closed (it reads its instructions from it).
    drop(stdin);
    let status = node.wait().unwrap();
    assert!(
        status.success(),
        "dashboard scenario: {status}\n{}",
        std::fs::read_to_string(&stderr_log).unwrap_or_default()
    );
    let done = run.wait_for_code(
        Duration::from_secs(300),
        0,
        "the dashboard's job did not PASS",
    );
    assert!(done.stdout.contains("dashboard tick 6"), "{}", done.stdout);
    for shot in ["farm.png", "queue.png", "job.png"] {
        assert!(shots.join(shot).is_file(), "no screenshot {shot}");
    }
    // Machine B went through its quick check after the activation.
    farm.wait_for("two IDLE machines again", Duration::from_secs(300), |f| {
        let m = f.machines();
        (m.len() == 2 && m.iter().all(|m| m["state"] == "IDLE")).then_some(())
    });
    eprintln!(
        "dashboard step done in {:.1} s; screenshots in {}",
        t0.elapsed().as_secs_f64(),
        shots.display()
    );
}
