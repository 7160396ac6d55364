// The chat example in a real browser: headless Chromium (Debian's /usr/bin/chromium)
// driven by playwright-core. examples/chat/tests/browser.rs starts the servers and runs this.
//
//   node chat.test.mjs --backend amqp --a http://127.0.0.1:PORT_A --b http://127.0.0.1:PORT_B \
//        --kill-pid PID_OF_B --artifacts DIR
//   node chat.test.mjs --backend memory --a http://127.0.0.1:PORT_A --artifacts DIR
//
// Two servers (A and B on one layer URL):
//   1. page 1 on A and page 2 on B join room r1; page 3 on A joins r2;
//   2. a line typed in page 1 appears in page 2 (across processes) and in page 1;
//   3. a later line in r2 reaches page 3, and page 3 has not seen page 1's r1 line; a later
//      line in r1 reaches page 2, and page 2 has not seen the r2 line;
//   4. B is killed (SIGKILL): page 2 shows it lost its connection; page 1 and page 3 go on
//      on A: a new page 4 on A joins r1 and receives from page 1, page 3 talks in r2;
//   5. page 4 goes away: A's /stats shows its connection and membership gone;
//   6. with --term-pid (server A's pid): A gets SIGTERM and page 1 sees it close with 1001
//      (going away); the caller checks that A then exits with status 0.
// One server (memory://, --b left out): pages 1, 2 and 3 are all on A; in step 4 page 2
// vanishes instead of a server being killed, and A's /stats shows it gone.
//
// Every wait polls with a deadline (Playwright's waitFor; --timeout-ms, default 20000): no
// fixed sleeps. Screenshots (PNG) go to --artifacts. Exit status 0 only when all passed.

import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join as joinPath } from "node:path";

function parseArgs(argv) {
  const args = { timeoutMs: 20000, executable: process.env.CHROMIUM || "/usr/bin/chromium" };
  for (let i = 0; i < argv.length; i += 2) {
    const [key, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${key} needs a value`);
    switch (key) {
      case "--backend": args.backend = value; break;
      case "--a": args.a = value; break;
      case "--b": args.b = value; break;
      case "--kill-pid": args.killPid = Number(value); break;
      case "--term-pid": args.termPid = Number(value); break;
      case "--artifacts": args.artifacts = value; break;
      case "--timeout-ms": args.timeoutMs = Number(value); break;
      case "--chromium": args.executable = value; break;
      default: throw new Error(`unknown argument ${key}`);
    }
  }
  for (const need of ["backend", "a", "artifacts"]) {
    if (!args[need]) throw new Error(`--${need} is required`);
  }
  if (args.b && !args.killPid) throw new Error("--b needs --kill-pid (the pid of server B)");
  return args;
}

const args = parseArgs(process.argv.slice(2));
const T = args.timeoutMs;
const started = Date.now();
const run = `${args.backend}-${started.toString(36)}`;
const timings = {};
mkdirSync(args.artifacts, { recursive: true });

function step(text) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(2)}s] ${text}`);
}

async function waitUntil(what, check, timeoutMs = T) {
  const deadline = Date.now() + timeoutMs;
  for (let delay = 25; ; delay = Math.min(delay * 2, 250)) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}

async function stats(base) {
  const res = await fetch(`${base}/stats`);
  if (!res.ok) throw new Error(`${base}/stats: ${res.status}`);
  return res.json();
}

const browser = await chromium.launch({
  executablePath: args.executable,
  headless: true,
  // The tests run as root, where Chromium's sandbox cannot start.
  args: ["--no-sandbox"],
});
const pages = {};

async function open(label, base, name) {
  const context = await browser.newContext({ viewport: { width: 900, height: 700 } });
  const page = await context.newPage();
  page.on("pageerror", (err) => console.log(`${label}: page error: ${err.message}`));
  await page.goto(base);
  await page.locator('#status[data-state="open"]').waitFor({ timeout: T });
  await page.locator("#server[data-server]").waitFor({ timeout: T });
  await page.fill("#name", name);
  pages[label] = page;
  return page;
}

async function join(page, room) {
  await page.fill("#room", room);
  await page.click("#join");
  await page.locator(`#rooms span[data-room="${room}"][data-joined="true"]`).waitFor({ timeout: T });
}

async function say(page, room, text) {
  await page.fill("#room", room);
  await page.fill("#text", text);
  await page.click("#send");
}

function line(page, text) {
  return page.locator("#messages li.message", { hasText: text });
}

async function expectLine(page, text) {
  const t0 = Date.now();
  await line(page, text).first().waitFor({ timeout: T });
  return Date.now() - t0;
}

async function expectNoLine(page, text, why) {
  const n = await line(page, text).count();
  if (n !== 0) throw new Error(`${why}: found ${n} line(s) with ${JSON.stringify(text)}`);
}

async function screenshots(tag) {
  for (const [label, page] of Object.entries(pages)) {
    if (page.isClosed()) continue;
    const path = joinPath(args.artifacts, `${args.backend}-${tag}-${label}.png`);
    await page.screenshot({ path, fullPage: true });
  }
}

let failed = null;
try {
  const two = Boolean(args.b);
  const B = two ? args.b : args.a;
  step(`${args.backend}: ${two ? `servers A ${args.a} and B ${B}` : `one server ${args.a}`}`);

  const p1 = await open("page1", args.a, "ann");
  const p2 = await open("page2", B, "bob");
  const p3 = await open("page3", args.a, "cat");
  const serverA = await p1.getAttribute("#server", "data-server");
  const serverB = await p2.getAttribute("#server", "data-server");
  if (two && serverA === serverB) throw new Error(`pages 1 and 2 are on one server (${serverA})`);
  await join(p1, "r1");
  await join(p2, "r1");
  await join(p3, "r2");
  step("pages 1 (A) and 2 (B) joined r1; page 3 (A) joined r2");

  // 2. page 1 -> page 2, across processes.
  const m1 = `hello from ann ${run}`;
  const t1 = Date.now();
  await say(p1, "r1", m1);
  await expectLine(p2, m1);
  timings.cross_ms = Date.now() - t1;
  await expectLine(p1, m1);
  const from = await line(p2, m1).first().getAttribute("data-server");
  if (from !== serverA) throw new Error(`page 2 got the line relayed by ${from}, expected ${serverA}`);
  step(`page 2 got page 1's line in ${timings.cross_ms} ms (typed to seen, through the layer)`);

  // 3. Rooms are separate: a later line in r2 reaches page 3, which never saw r1's line...
  const m2 = `marker in r2 ${run}`;
  await say(p3, "r2", m2);
  await expectLine(p3, m2);
  await expectNoLine(p3, m1, "page 3 is in r2 only but saw r1's line");
  // ...and a later line in r1 reaches page 2, which never saw r2's line.
  const m3 = `second in r1 ${run}`;
  await say(p1, "r1", m3);
  await expectLine(p2, m3);
  await expectNoLine(p2, m2, "page 2 is in r1 only but saw r2's line");
  await expectNoLine(p1, m2, "page 1 is in r1 only but saw r2's line");
  step("r1 and r2 are separate (checked after later lines arrived)");
  await screenshots("1-rooms");

  // 4. One side goes away.
  let before = await stats(args.a);
  if (two) {
    process.kill(args.killPid, "SIGKILL");
    step(`server B (pid ${args.killPid}) killed with SIGKILL`);
    await p2.locator('#status[data-state="closed"]').waitFor({ timeout: T });
    step(`page 2 shows: ${await p2.textContent("#status")}`);
  } else {
    const memberships = before.memberships;
    await p2.context().close();
    delete pages.page2;
    await waitUntil("A's /stats to show page 2 gone", async () => {
      const s = await stats(args.a);
      return s.connections === before.connections - 1 && s.memberships === memberships - 1;
    });
    step("page 2 vanished; server A dropped its connection and its membership of r1");
    before = await stats(args.a);
  }
  const p4 = await open("page4", args.a, "dan");
  await join(p4, "r1");
  const m4 = `after the loss ${run}`;
  const t4 = Date.now();
  await say(p1, "r1", m4);
  await expectLine(p4, m4);
  timings.after_loss_ms = Date.now() - t4;
  await expectLine(p1, m4);
  const m5 = `r2 goes on ${run}`;
  await say(p3, "r2", m5);
  await expectLine(p3, m5);
  await expectNoLine(p4, m5, "page 4 is in r1 only but saw r2's line");
  if (two) {
    await expectNoLine(p2, m4, "page 2 lost its server but got a later line");
    const state = await p2.getAttribute("#status", "data-state");
    if (state === "open") throw new Error("page 2 says it is connected, but its server is dead");
  }
  step(`page 4 (A) got page 1's line in ${timings.after_loss_ms} ms; page 3 still talks in r2`);
  await screenshots("2-after-loss");

  // 5. A page that goes away takes its connection and membership with it.
  const s4 = await stats(args.a);
  await p4.context().close();
  delete pages.page4;
  await waitUntil("A's /stats to show page 4 gone", async () => {
    const s = await stats(args.a);
    return s.connections === s4.connections - 1 && s.memberships === s4.memberships - 1;
  });
  const end = await stats(args.a);
  step(`page 4 closed: A has ${end.connections} connections, ${end.memberships} memberships, dropped_slow=${end.dropped_slow}, said=${end.said}, delivered=${end.delivered}`);
  if (end.dropped_slow !== 0) throw new Error(`A dropped ${end.dropped_slow} lines for slow clients`);

  // 6. A clean stop: connections are closed with 1001 after leaving their rooms.
  if (args.termPid) {
    process.kill(args.termPid, "SIGTERM");
    step(`server A (pid ${args.termPid}) sent SIGTERM`);
    await waitUntil("page 1 to see server A close with 1001 (going away)", async () =>
      ((await p1.getAttribute("#status", "data-closes")) || "").split(" ").includes("1001"));
    step(`page 1 saw A go away: close codes ${await p1.getAttribute("#status", "data-closes")}`);
    await screenshots("3-stopped");
  }
} catch (err) {
  failed = err;
  console.log(`FAILED: ${err.stack || err}`);
  try { await screenshots("failed"); } catch (e) { console.log(`(screenshots failed too: ${e.message})`); }
} finally {
  await browser.close();
}

if (failed) {
  process.exitCode = 1;
} else {
  console.log(`PASS ${args.backend} ${JSON.stringify({ ...timings, total_ms: Date.now() - started })}`);
  console.log(`screenshots in ${args.artifacts}`);
}
