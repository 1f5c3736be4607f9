// `cargo xtask bench dashboard`: the farm page of a farm of simulated machines in Debian's
// chromium (headless, playwright-core). Prints `ROW\t<figure>\t<value>` lines.
//
// Environment: DASH_URL (the executor), DASH_ADMIN (token), DASH_MARS (mars' URL),
// DASH_RETIRE (the MAC retired through mars' API), DASH_LOADS, CHROMIUM, DASH_LIMITS ("1":
// fail beyond the limits).
import { chromium } from "playwright-core";

const url = process.env.DASH_URL;
const loads = Number(process.env.DASH_LOADS || 5);
const mac = process.env.DASH_RETIRE;
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[Math.floor(s.length / 2)]; };

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM, headless: true, args: ["--no-sandbox"] });
try {
  const ctx = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await ctx.newPage();
  await page.goto(`${url}/ui/login`);
  await page.fill("#token", process.env.DASH_ADMIN);
  await Promise.all([page.waitForURL(`${url}/ui/farm`), page.click("#sign-in")]);
  const machines = await page.locator("tr.machine").count();
  const times = [];
  let bytes = 0;
  for (let i = 0; i < loads; i++) {
    const t = performance.now();
    const resp = await page.goto(`${url}/ui/farm`, { waitUntil: "load" });
    await page.locator("tr.machine").last().waitFor();
    times.push(performance.now() - t);
    bytes = (await resp.body()).length;
  }
  // A state change through the API (not the page) shows in the open page within a second.
  const t = performance.now();
  const r = await fetch(`${process.env.DASH_MARS}/api/v1/machine/${mac}/retire`, {
    method: "POST",
    headers: { authorization: `Bearer ${process.env.DASH_ADMIN}`, "content-type": "application/json" },
    body: JSON.stringify({ reason: "dashboard benchmark" }),
  });
  if (!r.ok) throw new Error(`retire through mars: ${r.status} ${await r.text()}`);
  // mars has stored the change when it answers: from there on the page must show it.
  const changed = performance.now();
  await page.locator(`tr.machine[data-id="${mac}"][data-state="RETIRED"]`).waitFor({ timeout: 10000 });
  const shown = performance.now();
  const update = shown - changed;
  console.log(`ROW\tmachines on the farm page\t${machines}`);
  console.log(`ROW\tfarm page HTML (bytes)\t${bytes}`);
  console.log(`ROW\tfarm page load, median of ${loads} (ms)\t${median(times).toFixed(0)}`);
  console.log(`ROW\tfarm page load, slowest of ${loads} (ms)\t${Math.max(...times).toFixed(0)}`);
  console.log(`ROW\tretire request through mars' API (ms)\t${(changed - t).toFixed(0)}`);
  console.log(`ROW\tstate changed (mars answered) → shown in the open page (ms)\t${update.toFixed(0)}`);
  // The smoke run (`--quick`, beside the test suite) checks that the harness works, not speed.
  if (process.env.DASH_LIMITS === "1") {
    if (median(times) >= 1000) throw new Error(`median load ${median(times).toFixed(0)} ms is not under 1 s`);
    if (update >= 1000) throw new Error(`the state change took ${update.toFixed(0)} ms to show (limit 1 s)`);
  }
} catch (e) {
  process.stderr.write(`dashboard bench failed: ${e.message}\n`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
