// The dashboard's browser acceptance (tests/virtual_farm/dashboard.rs runs it): Debian's
// chromium, headless, driven by playwright-core.
//
// Environment: DASH_URL (the executor), DASH_ADMIN / DASH_USER (tokens), DASH_MACHINES
// (two MACs, comma-separated), DASH_OUT (screenshots), CHROMIUM (the browser).
// Talks to the test on stdout/stdin, one line each: it prints `farm-idle` once both machines
// show IDLE, then reads `job <id>` (a job the test submitted with dutctl); it prints `ok`
// at the end. Any failure exits non-zero with one line on stderr.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const url = process.env.DASH_URL;
const [a, b] = process.env.DASH_MACHINES.split(",");
const out = process.env.DASH_OUT;
const input = createInterface({ input: process.stdin });
const lines = input[Symbol.asyncIterator]();
const say = (l) => process.stdout.write(l + "\n");
const t0 = Date.now();
const log = (l) => process.stderr.write(`[dashboard ${((Date.now() - t0) / 1000).toFixed(1)}s] ${l}\n`);

const row = (page, mac) => page.locator(`tr.machine[data-id="${mac}"]`);

async function signIn(browser, token) {
  const ctx = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await ctx.newPage();
  await page.goto(`${url}/ui/login`);
  await page.fill("#token", token);
  await Promise.all([page.waitForURL(`${url}/ui/farm`), page.click("#sign-in")]);
  return page;
}

async function confirmAction(page, mac, action) {
  await row(page, mac).locator(`a[data-action="${action}"]`).click();
  await page.waitForSelector("#question");
  await page.click("#confirm");
  await page.waitForSelector("#done, #error");
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  headless: true,
  // The test runs as root in a container: chromium's sandbox needs user namespaces.
  args: ["--no-sandbox"],
});
try {
  const page = await signIn(browser, process.env.DASH_ADMIN);
  for (const mac of [a, b]) {
    await row(page, mac).and(page.locator('[data-state="IDLE"]')).waitFor({ timeout: 10000 });
  }
  await page.screenshot({ path: `${out}/farm.png`, fullPage: true });
  log("signed in as admin, both machines IDLE");
  say("farm-idle");

  const job = /^job (\d+)$/.exec((await lines.next()).value ?? "");
  if (!job) throw new Error("the test did not send `job <id>`");
  const id = job[1];
  await page.goto(`${url}/ui/queue`);
  await page.screenshot({ path: `${out}/queue.png`, fullPage: true });
  await page.goto(`${url}/ui/jobs/${id}`);
  // The console streams while the job runs: bytes arrive with the job not yet finished,
  // and keep arriving.
  const box = page.locator("#console");
  await page.waitForFunction(() => {
    const n = Number(document.querySelector("#console").dataset.bytes || 0);
    const st = document.querySelector("#job-state")?.dataset.state;
    return n > 0 && st === "RUNNING";
  }, null, { timeout: 120000 });
  const first = Number(await box.getAttribute("data-bytes"));
  await page.waitForFunction((n) => Number(document.querySelector("#console").dataset.bytes) > n, first, { timeout: 60000 });
  // The DUT's own output (the kernel command line holds `dashboard tick $i`, not a digit).
  await page.locator(".xterm-rows", { hasText: /dashboard tick [1-9]/ }).waitFor({ timeout: 60000 });
  await page.screenshot({ path: `${out}/job.png`, fullPage: true });
  log(`job ${id}: console streaming live (${first} bytes, then more)`);

  // Retire machine b from the page, see it, activate it again.
  await page.goto(`${url}/ui/farm`);
  await confirmAction(page, b, "retire");
  if (await page.locator("#error").count()) throw new Error("retire refused: " + (await page.textContent("#error")));
  await page.goto(`${url}/ui/farm`);
  await row(page, b).and(page.locator('[data-state="RETIRED"]')).waitFor({ timeout: 2000 });
  log(`${b} RETIRED from the page`);
  await confirmAction(page, b, "activate");
  if (await page.locator("#error").count()) throw new Error("activate refused: " + (await page.textContent("#error")));
  await page.goto(`${url}/ui/farm`);
  await row(page, b).and(page.locator(':not([data-state="RETIRED"])')).waitFor({ timeout: 2000 });
  log(`${b} activated from the page`);

  // A user is refused an admin action, with the reason.
  const user = await signIn(browser, process.env.DASH_USER);
  await confirmAction(user, a, "retire");
  const err = (await user.textContent("#error")) ?? "";
  if (!/refused/.test(err) || !/admin/.test(err)) throw new Error(`user retire: expected a refusal, got ${JSON.stringify(err)}`);
  await user.screenshot({ path: `${out}/refused.png`, fullPage: true });
  log(`user refused: ${err}`);
  say("ok");
} catch (e) {
  process.stderr.write(`dashboard scenario failed: ${e.message}\n`);
  process.exitCode = 1;
} finally {
  await browser.close();
  // An open stdin would keep node running after the last step.
  input.close();
  process.stdin.destroy();
}
