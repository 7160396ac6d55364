#!/usr/bin/env bash
# Makes sure the chat example's browser test (examples/chat/tests/browser.rs) can run, on a
# fresh Debian machine or a warm one:
#   - Debian's chromium at /usr/bin/chromium (installed with apt-get if missing; the package
#     lists are refreshed only when the install needs it),
#   - Node.js 20 or later with npm (Debian's nodejs and npm if missing),
#   - examples/chat/browser/node_modules from its package-lock.json (`npm ci`), when missing
#     or stale (the lock file changed since the last install).
# Playwright's own browser download is not used (it does not work here): the test drives
# /usr/bin/chromium through playwright-core. A no-op (well under a second) when all of that
# is already true. Needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/../.."

BROWSER_DIR=examples/chat/browser
STAMP=$BROWSER_DIR/node_modules/.chanlayer-lock.sha256
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

say() { printf 'browsers: %s\n' "$*"; }
die() { printf 'browsers: ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

apt_install() { # apt_install PACKAGE...: without refreshing the lists first, then with
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; then
    say "refreshing the package lists (apt-get update)"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  fi
}

# 1. Chromium.
if [ ! -x "$CHROMIUM" ]; then
  [ "$CHROMIUM" = /usr/bin/chromium ] || die "CHROMIUM=$CHROMIUM is not an executable"
  command -v apt-get >/dev/null 2>&1 || die "/usr/bin/chromium is missing and there is no apt-get; install Chromium, or set CHROMIUM to a Chromium binary"
  t=$(now)
  say "installing Debian's chromium"
  apt_install chromium
  say "chromium installed in $(took "$t")"
fi
# Debian's wrapper script prints a harmless shell warning on some machines; keep its version line.
version=$("$CHROMIUM" --version 2>/dev/null | grep -i chrom || true)
[ -n "$version" ] || die "$CHROMIUM --version printed nothing; is it a Chromium?"

# 2. Node.js (playwright-core 1.65 needs 20 or later).
node_major() { node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  command -v apt-get >/dev/null 2>&1 || die "node and npm are missing; install Node.js 20 or later"
  t=$(now)
  say "installing Debian's nodejs and npm"
  apt_install nodejs npm
  say "nodejs installed in $(took "$t")"
fi
[ "$(node_major)" -ge 20 ] || die "Node.js $(node --version) is too old: playwright-core needs 20 or later (https://nodejs.org, or NodeSource's Debian packages)"

# 3. The test's node_modules, exactly as locked.
want=$(sha256sum "$BROWSER_DIR/package-lock.json" | cut -d' ' -f1)
have=$(cat "$STAMP" 2>/dev/null || true)
if [ "$want" != "$have" ] || [ ! -f "$BROWSER_DIR/node_modules/playwright-core/package.json" ]; then
  t=$(now)
  say "npm ci in $BROWSER_DIR"
  (cd "$BROWSER_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  printf '%s\n' "$want" >"$STAMP"
  say "node_modules installed in $(took "$t")"
fi

say "ready: $version at $CHROMIUM, node $(node --version), playwright-core $(node -p "require('./$BROWSER_DIR/node_modules/playwright-core/package.json').version")"
