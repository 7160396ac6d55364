// The chat across Django and Rust: a page on the Django example (examples/chat/django, on
// channels_rabbitmq) and a page on the Rust chat (wire=channels_rabbitmq) in one room, over
// one RabbitMQ. examples/chat/tests/django.rs starts both servers and runs this:
//
//   node django.test.mjs --django http://127.0.0.1:PORT_D --rust http://127.0.0.1:PORT_R \
//        --artifacts DIR
//
//   1. page 1 on Django and page 2 on Rust join room r1; page 3 on Rust joins r2;
//   2. a line typed in page 1 (Django) appears in page 2 (Rust), relayed by the Django
//      server, and in page 1; a line typed in page 2 appears in page 1, relayed by Rust;
//   3. a line in r2 (page 3) reaches page 3 and neither page 1 nor page 2, and page 3 saw
//      neither r1 line (each checked after a later line reached the page);
//   4. page 1 leaves r1 and joins r2 (Django's group_discard and group_add): a line page 2
//      says in r1 reaches page 2 and not page 1; a later line from page 3 in r2 reaches
//      page 1.
// Any two servers that speak the chat's protocol will do (two Django processes, say).
//
// Every wait polls with a deadline (Playwright's waitFor; --timeout-ms, default 20000): no
// fixed sleeps. Screenshots (PNG) go to --artifacts. Prints "PASS django {timings}" and
// exits 0 only when all passed.

import { ChatBrowser, elapsedMs, parseArgs, runSteps, step } from "./pages.mjs";

const args = parseArgs(process.argv.slice(2), { "--django": "django", "--rust": "rust" }, ["django", "rust"]);
const run = `django-${Date.now().toString(36)}`;
const timings = {};
const chat = await ChatBrowser.launch({ ...args, tag: "django" });

/// Says `text` in `room` from page `from`; waits until every page in `to` shows it; returns ms.
async function relay(from, room, text, to) {
  const t0 = Date.now();
  await chat.say(from, room, text);
  for (const page of to) await chat.expectLine(page, text);
  return Date.now() - t0;
}

async function relayedBy(page, text) {
  return chat.line(page, text).first().getAttribute("data-server");
}

const passed = await runSteps(chat, async () => {
  step(`Django ${args.django}, Rust ${args.rust}`);
  const p1 = await chat.open("page1", args.django, "ann");
  const p2 = await chat.open("page2", args.rust, "bob");
  const p3 = await chat.open("page3", args.rust, "cat");
  const django = await p1.getAttribute("#server", "data-server");
  const rust = await p2.getAttribute("#server", "data-server");
  if (django === rust) throw new Error(`pages 1 and 2 are on one server (${django})`);
  step(`page 1: ${await p1.textContent("#server")}; pages 2 and 3: ${await p2.textContent("#server")}`);
  await chat.join(p1, "r1");
  await chat.join(p2, "r1");
  await chat.join(p3, "r2");
  step("page 1 (Django) and page 2 (Rust) joined r1; page 3 (Rust) joined r2");

  // 2. Both ways through RabbitMQ.
  const m1 = `from django ${run}`;
  timings.django_to_rust_ms = await relay(p1, "r1", m1, [p2]);
  await chat.expectLine(p1, m1);
  const by1 = await relayedBy(p2, m1);
  if (by1 !== django) throw new Error(`page 2 got page 1's line relayed by ${by1}, expected ${django}`);
  step(`page 2 (Rust) got page 1's (Django) line in ${timings.django_to_rust_ms} ms`);
  const m2 = `from rust ${run}`;
  timings.rust_to_django_ms = await relay(p2, "r1", m2, [p1]);
  await chat.expectLine(p2, m2);
  const by2 = await relayedBy(p1, m2);
  if (by2 !== rust) throw new Error(`page 1 got page 2's line relayed by ${by2}, expected ${rust}`);
  step(`page 1 (Django) got page 2's (Rust) line in ${timings.rust_to_django_ms} ms`);

  // 3. Rooms are separate, on both servers.
  const m3 = `in r2 ${run}`;
  await relay(p3, "r2", m3, [p3]);
  await chat.expectNoLine(p3, m1, "page 3 is in r2 only but saw Django's r1 line");
  await chat.expectNoLine(p3, m2, "page 3 is in r2 only but saw Rust's r1 line");
  const m4 = `later in r1 ${run}`;
  await relay(p1, "r1", m4, [p1, p2]);
  await chat.expectNoLine(p1, m3, "page 1 is in r1 only but saw r2's line");
  await chat.expectNoLine(p2, m3, "page 2 is in r1 only but saw r2's line");
  step("r1 and r2 are separate (checked after later lines arrived)");
  await chat.screenshots("1-rooms");

  // 4. Django leaves: its group_discard unbinds r1, its group_add binds r2.
  await p1.fill("#room", "r1");
  await p1.click("#leave");
  await p1.locator('#rooms span[data-room="r1"]').waitFor({ state: "detached", timeout: args.timeoutMs });
  await chat.join(p1, "r2");
  const m5 = `r1 without django ${run}`;
  await relay(p2, "r1", m5, [p2]);
  const m6 = `r2 with django ${run}`;
  timings.rust_to_django_r2_ms = await relay(p3, "r2", m6, [p3, p1]);
  await chat.expectNoLine(p1, m5, "page 1 left r1 but got a later r1 line");
  await chat.expectNoLine(p2, m6, "page 2 is in r1 only but saw r2's line");
  step("page 1 left r1 for r2: r1's next line passed it by, r2's reached it");
  await chat.screenshots("2-left");
});

if (passed) {
  console.log(`PASS django ${JSON.stringify({ ...timings, total_ms: elapsedMs() })}`);
  console.log(`screenshots in ${args.artifacts}`);
}
