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

import { ChatBrowser, elapsedMs, parseArgs, runSteps, stats, step, waitUntil } from "./pages.mjs";

const args = parseArgs(
  process.argv.slice(2),
  {
    "--backend": "backend",
    "--a": "a",
    "--b": "b",
    "--kill-pid": ["killPid", Number],
    "--term-pid": ["termPid", Number],
  },
  ["backend", "a"],
);
if (args.b && !args.killPid) throw new Error("--b needs --kill-pid (the pid of server B)");
const T = args.timeoutMs;
const run = `${args.backend}-${Date.now().toString(36)}`;
const timings = {};

const chat = await ChatBrowser.launch({ ...args, tag: args.backend });
const passed = await runSteps(chat, async () => {
  const two = Boolean(args.b);
  const B = two ? args.b : args.a;
  step(`${args.backend}: ${two ? `servers A ${args.a} and B ${B}` : `one server ${args.a}`}`);

  const p1 = await chat.open("page1", args.a, "ann");
  const p2 = await chat.open("page2", B, "bob");
  const p3 = await chat.open("page3", args.a, "cat");
  const serverA = await p1.getAttribute("#server", "data-server");
  const serverB = await p2.getAttribute("#server", "data-server");
  if (two && serverA === serverB) throw new Error(`pages 1 and 2 are on one server (${serverA})`);
  await chat.join(p1, "r1");
  await chat.join(p2, "r1");
  await chat.join(p3, "r2");
  step("pages 1 (A) and 2 (B) joined r1; page 3 (A) joined r2");

  // 2. page 1 -> page 2, across processes.
  const m1 = `hello from ann ${run}`;
  const t1 = Date.now();
  await chat.say(p1, "r1", m1);
  await chat.expectLine(p2, m1);
  timings.cross_ms = Date.now() - t1;
  await chat.expectLine(p1, m1);
  const from = await chat.line(p2, m1).first().getAttribute("data-server");
  if (from !== serverA) throw new Error(`page 2 got the line relayed by ${from}, expected ${serverA}`);
  step(`page 2 got page 1's line in ${timings.cross_ms} ms (typed to seen, through the layer)`);

  // 3. Rooms are separate: a later line in r2 reaches page 3, which never saw r1's line...
  const m2 = `marker in r2 ${run}`;
  await chat.say(p3, "r2", m2);
  await chat.expectLine(p3, m2);
  await chat.expectNoLine(p3, m1, "page 3 is in r2 only but saw r1's line");
  // ...and a later line in r1 reaches page 2, which never saw r2's line.
  const m3 = `second in r1 ${run}`;
  await chat.say(p1, "r1", m3);
  await chat.expectLine(p2, m3);
  await chat.expectNoLine(p2, m2, "page 2 is in r1 only but saw r2's line");
  await chat.expectNoLine(p1, m2, "page 1 is in r1 only but saw r2's line");
  step("r1 and r2 are separate (checked after later lines arrived)");
  await chat.screenshots("1-rooms");

  // 4. One side goes away.
  let before = await stats(args.a);
  if (two) {
    process.kill(args.killPid, "SIGKILL");
    step(`server B (pid ${args.killPid}) killed with SIGKILL`);
    await p2.locator('#status[data-state="closed"]').waitFor({ timeout: T });
    step(`page 2 shows: ${await p2.textContent("#status")}`);
  } else {
    const memberships = before.memberships;
    await chat.close("page2");
    await waitUntil("A's /stats to show page 2 gone", async () => {
      const s = await stats(args.a);
      return s.connections === before.connections - 1 && s.memberships === memberships - 1;
    }, T);
    step("page 2 vanished; server A dropped its connection and its membership of r1");
    before = await stats(args.a);
  }
  const p4 = await chat.open("page4", args.a, "dan");
  await chat.join(p4, "r1");
  const m4 = `after the loss ${run}`;
  const t4 = Date.now();
  await chat.say(p1, "r1", m4);
  await chat.expectLine(p4, m4);
  timings.after_loss_ms = Date.now() - t4;
  await chat.expectLine(p1, m4);
  const m5 = `r2 goes on ${run}`;
  await chat.say(p3, "r2", m5);
  await chat.expectLine(p3, m5);
  await chat.expectNoLine(p4, m5, "page 4 is in r1 only but saw r2's line");
  if (two) {
    await chat.expectNoLine(p2, m4, "page 2 lost its server but got a later line");
    const state = await p2.getAttribute("#status", "data-state");
    if (state === "open") throw new Error("page 2 says it is connected, but its server is dead");
  }
  step(`page 4 (A) got page 1's line in ${timings.after_loss_ms} ms; page 3 still talks in r2`);
  await chat.screenshots("2-after-loss");

  // 5. A page that goes away takes its connection and membership with it.
  const s4 = await stats(args.a);
  await chat.close("page4");
  await waitUntil("A's /stats to show page 4 gone", async () => {
    const s = await stats(args.a);
    return s.connections === s4.connections - 1 && s.memberships === s4.memberships - 1;
  }, T);
  const end = await stats(args.a);
  step(`page 4 closed: A has ${end.connections} connections, ${end.memberships} memberships, dropped_slow=${end.dropped_slow}, said=${end.said}, delivered=${end.delivered}`);
  if (end.dropped_slow !== 0) throw new Error(`A dropped ${end.dropped_slow} lines for slow clients`);

  // 6. A clean stop: connections are closed with 1001 after leaving their rooms.
  if (args.termPid) {
    process.kill(args.termPid, "SIGTERM");
    step(`server A (pid ${args.termPid}) sent SIGTERM`);
    await waitUntil("page 1 to see server A close with 1001 (going away)", async () =>
      ((await p1.getAttribute("#status", "data-closes")) || "").split(" ").includes("1001"), T);
    step(`page 1 saw A go away: close codes ${await p1.getAttribute("#status", "data-closes")}`);
    await chat.screenshots("3-stopped");
  }
});

if (passed) {
  console.log(`PASS ${args.backend} ${JSON.stringify({ ...timings, total_ms: elapsedMs() })}`);
  console.log(`screenshots in ${args.artifacts}`);
}
