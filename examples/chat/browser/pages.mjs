// What the chat's browser scripts share (chat.test.mjs, django.test.mjs): arguments, timed
// steps, polling with a deadline, and a headless Chromium (Debian's /usr/bin/chromium driven
// by playwright-core) whose pages speak the chat page's controls (src/page.html).
//
// Every wait polls with a deadline (Playwright's waitFor, or waitUntil below): no fixed
// sleeps.

import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join as joinPath } from "node:path";

const started = Date.now();

/// Parses `--flag value` pairs. `flags` maps a flag to the key it sets, or to [key, convert].
/// --artifacts, --timeout-ms (default 20000) and --chromium (default $CHROMIUM or
/// /usr/bin/chromium) are always understood; `required` lists keys that must be given.
export function parseArgs(argv, flags, required = []) {
  const args = { timeoutMs: 20000, executable: process.env.CHROMIUM || "/usr/bin/chromium" };
  const known = {
    "--artifacts": "artifacts",
    "--timeout-ms": ["timeoutMs", Number],
    "--chromium": "executable",
    ...flags,
  };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    const spec = known[flag];
    if (!spec) throw new Error(`unknown argument ${flag}`);
    if (value === undefined) throw new Error(`${flag} needs a value`);
    const [key, convert] = Array.isArray(spec) ? spec : [spec, String];
    args[key] = convert(value);
  }
  for (const need of ["artifacts", ...required]) {
    if (!args[need]) throw new Error(`--${need.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} is required`);
  }
  mkdirSync(args.artifacts, { recursive: true });
  return args;
}

/// Prints a line with the seconds since the script started.
export function step(text) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(2)}s] ${text}`);
}

/// Polls `check` (backing off from 25 to 250 ms) until it returns something truthy, which it
/// returns; throws after `timeoutMs`.
export async function waitUntil(what, check, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (let delay = 25; ; delay = Math.min(delay * 2, 250)) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}

/// A server's `/stats` counters (the Rust chat's).
export async function stats(base) {
  const res = await fetch(`${base}/stats`);
  if (!res.ok) throw new Error(`${base}/stats: ${res.status}`);
  return res.json();
}

/// A headless Chromium and the chat pages opened in it. `tag` starts the screenshots' names;
/// `timeoutMs` bounds every wait.
export class ChatBrowser {
  static async launch({ executable, artifacts, tag, timeoutMs }) {
    const browser = await chromium.launch({
      executablePath: executable,
      headless: true,
      // The tests run as root, where Chromium's sandbox cannot start.
      args: ["--no-sandbox"],
    });
    return new ChatBrowser(browser, artifacts, tag, timeoutMs);
  }

  constructor(browser, artifacts, tag, timeoutMs) {
    this.browser = browser;
    this.artifacts = artifacts;
    this.tag = tag;
    this.T = timeoutMs;
    this.pages = {};
  }

  /// Opens the chat page at `base` in a context of its own, waits until it is connected and
  /// knows its server, and types `name` into the name field.
  async open(label, base, name) {
    const context = await this.browser.newContext({ viewport: { width: 900, height: 700 } });
    const page = await context.newPage();
    page.on("pageerror", (err) => console.log(`${label}: page error: ${err.message}`));
    await page.goto(base);
    await page.locator('#status[data-state="open"]').waitFor({ timeout: this.T });
    await page.locator("#server[data-server]").waitFor({ timeout: this.T });
    await page.fill("#name", name);
    this.pages[label] = page;
    return page;
  }

  /// Closes a page's context (its websocket goes with it).
  async close(label) {
    await this.pages[label].context().close();
    delete this.pages[label];
  }

  async join(page, room) {
    await page.fill("#room", room);
    await page.click("#join");
    await page.locator(`#rooms span[data-room="${room}"][data-joined="true"]`).waitFor({ timeout: this.T });
  }

  async say(page, room, text) {
    await page.fill("#room", room);
    await page.fill("#text", text);
    await page.click("#send");
  }

  line(page, text) {
    return page.locator("#messages li.message", { hasText: text });
  }

  /// Waits for a line with `text` in `page`; returns how long it waited, in ms.
  async expectLine(page, text) {
    const t0 = Date.now();
    await this.line(page, text).first().waitFor({ timeout: this.T });
    return Date.now() - t0;
  }

  async expectNoLine(page, text, why) {
    const n = await this.line(page, text).count();
    if (n !== 0) throw new Error(`${why}: found ${n} line(s) with ${JSON.stringify(text)}`);
  }

  /// A PNG of every open page, named TAG-STAGE-LABEL.png.
  async screenshots(stage) {
    for (const [label, page] of Object.entries(this.pages)) {
      if (page.isClosed()) continue;
      const path = joinPath(this.artifacts, `${this.tag}-${stage}-${label}.png`);
      await page.screenshot({ path, fullPage: true });
    }
  }

  async shutdown() {
    await this.browser.close();
  }
}

/// Runs `body`; on failure prints the error, takes screenshots (stage "failed") and sets a
/// non-zero exit status. The browser is closed either way. Returns whether it passed.
export async function runSteps(chat, body) {
  let failed = null;
  try {
    await body();
  } catch (err) {
    failed = err;
    console.log(`FAILED: ${err.stack || err}`);
    try {
      await chat.screenshots("failed");
    } catch (e) {
      console.log(`(screenshots failed too: ${e.message})`);
    }
  } finally {
    await chat.shutdown();
  }
  if (failed) process.exitCode = 1;
  return !failed;
}

/// Milliseconds since the script started.
export function elapsedMs() {
  return Date.now() - started;
}
