#!/usr/bin/env bash
# Makes sure the Python side of the Django interop (issue 15) can run, on a fresh machine or
# a warm one: a virtual environment this script owns, at
#   ${CHANLAYER_VENV:-$HOME/.cache/chanlayer/venv}
# (outside the clone, so a warm machine keeps it), holding exactly the packages pinned in
# scripts/python/requirements.txt (channels_rabbitmq, channels, Django, Daphne...), installed
# with pip from PyPI. A stamp in the venv holds the sha256 of requirements.txt: when it
# matches, this is a no-op (well under a second); when the file changed, the venv is made
# anew, so nothing from an older pin list stays behind.
#   - python3 3.11 or later with its venv module (Debian: python3-venv, installed with
#     apt-get when missing and apt-get is there);
#   - the venv's python runs the Django example: "$VENV/bin/python" -m daphne ...
# Prints the venv's path on the last line ("python: ready: ...").
set -euo pipefail
cd "$(dirname "$0")/../.."

REQUIREMENTS=scripts/python/requirements.txt
VENV=${CHANLAYER_VENV:-$HOME/.cache/chanlayer/venv}
STAMP=$VENV/.chanlayer-requirements.sha256
PYTHON=${PYTHON:-python3}
# The modules the example and the tests import: the venv is usable only if they load.
MODULES=channels_rabbitmq,carehare,channels,django,daphne,msgpack

say() { printf 'python: %s\n' "$*"; }
die() { printf 'python: ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }

[ -f "$REQUIREMENTS" ] || die "$REQUIREMENTS is missing"
want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)

# Fast path: the stamp matches and the venv's python imports the packages.
if [ "$(cat "$STAMP" 2>/dev/null || true)" = "$want" ] &&
  "$VENV/bin/python" -c "import $MODULES" 2>/dev/null; then
  say "ready: $VENV ($("$VENV/bin/python" --version 2>&1), requirements $(printf '%.12s' "$want"))"
  exit 0
fi

# 1. A python3 recent enough for the pins (some of them need 3.11).
command -v "$PYTHON" >/dev/null 2>&1 ||
  die "$PYTHON not found on PATH; install Python 3.11 or later (Debian: apt-get install python3 python3-venv), or set PYTHON=/path/to/python3"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "$("$PYTHON" --version 2>&1) is too old: the pinned packages need Python 3.11 or later (set PYTHON=/path/to/python3.11+)"

# 2. Its venv module with ensurepip (Debian splits it out as python3-venv).
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  command -v apt-get >/dev/null 2>&1 ||
    die "$PYTHON has no working venv module (import venv, ensurepip failed); install it (Debian: python3-venv)"
  say "installing Debian's python3-venv"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends python3-venv >/dev/null 2>&1; then
    say "refreshing the package lists (apt-get update)"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-venv >/dev/null ||
      die "apt-get install python3-venv failed"
  fi
  "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null ||
    die "$PYTHON still has no working venv module after installing python3-venv (is $PYTHON Debian's python3?)"
fi

# 3. The venv, made anew. Only a directory this script made (it has the stamp file) or an
#    empty one is ever removed: CHANLAYER_VENV pointing at something else is an error.
if [ -e "$VENV" ]; then
  if [ -f "$STAMP" ] || [ -z "$(ls -A "$VENV" 2>/dev/null)" ]; then
    say "requirements changed or the venv is broken: making $VENV anew"
    rm -rf "$VENV"
  else
    die "$VENV exists and is not a venv made by this script (no $(basename "$STAMP")); remove it or set CHANLAYER_VENV to another path"
  fi
fi
t=$(now)
mkdir -p "$(dirname "$VENV")"
say "creating a virtual environment at $VENV with $("$PYTHON" --version 2>&1)"
"$PYTHON" -m venv "$VENV" || die "$PYTHON -m venv $VENV failed"
# Claim it at once (an empty stamp), so a failed install below is made anew next time.
: >"$STAMP"

# 4. Exactly the pinned packages: --no-deps installs the list and nothing else, pip check
#    then proves the list is complete (every requirement of every package is in it).
say "pip install -r $REQUIREMENTS"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  --no-deps -r "$REQUIREMENTS" ||
  die "pip could not install $REQUIREMENTS into $VENV (is PyPI reachable? see pip's message above)"
"$VENV/bin/python" -m pip check >/dev/null ||
  die "$REQUIREMENTS is incomplete or inconsistent: $("$VENV/bin/python" -m pip check 2>&1 | head -5 | tr '\n' ' ')"
"$VENV/bin/python" -c "import $MODULES" ||
  die "the venv at $VENV cannot import $MODULES after the install"
printf '%s\n' "$want" >"$STAMP"
say "installed $(grep -c '==' "$REQUIREMENTS") packages in $(took "$t")"
say "ready: $VENV ($("$VENV/bin/python" --version 2>&1), requirements $(printf '%.12s' "$want"))"
