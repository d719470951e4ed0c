#!/usr/bin/env bash
# Runs README.md's commands as a new user would, each in a fresh copy of this working tree
# (tracked and untracked-but-not-ignored files: no .venv, no caches) with a fresh virtual env.
#
# The README marks the blocks it promises work with a comment on the line before the fence:
#   <!-- check: serve -->    set up + run: started in the background; must answer :8000/health
#   <!-- check: request -->  bash, run while it serves; must exit 0
#   <!-- check: python -->   python, run while it serves; must exit 0
#   <!-- check: test -->     set up + test
# Requests run with the copy's venv active, as in the user's second terminal. Then the served
# command gets SIGINT (Ctrl-C) and no process of the copy may be left.
#
# The test command runs with `--collect-only`: it proves the install and that every test module
# imports; CI (.ci/run) runs the full suite itself, so running it twice would only cost time.
#
# Usage: scripts/check_readme.sh   (needs port 8000 free; ~4 min, mostly the two installs)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
# A new user has no virtual env active (CI calls this from inside one): leave it.
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PATH=${PATH//"$VIRTUAL_ENV/bin:"/}
    unset VIRTUAL_ENV
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/splitvl-readme.XXXXXX")
port=8000
serve_pid=""

log() { echo "check_readme: $*" >&2; }

fail() {
    log "FAILED: $*"
    exit 1
}

# Processes started from a copy: their command lines name the copy's venv (read from /proc, as
# CI machines may lack procps).
leftovers() {
    python3 -c 'import os, sys
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        continue
    if sys.argv[1] in cmdline and int(pid) != os.getpid():
        print(pid, cmdline)' "$work/"
}

cleanup() {
    if [[ -n "$serve_pid" ]] && kill -0 "$serve_pid" 2>/dev/null; then
        kill -KILL -- "-$serve_pid" 2>/dev/null || true
    fi
    for pid in $(leftovers | cut -d' ' -f1); do kill -KILL "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# Each marked fenced block becomes a file blocks/NN-KIND, NN in README order.
mkdir -p "$work/blocks"
awk -v dir="$work/blocks" '
    /^<!-- check: [a-z]+ -->$/ { kind = $3; next }
    kind != "" && !inside && /^```/ { inside = 1; n++; file = sprintf("%s/%02d-%s", dir, n, kind); next }
    inside && /^```$/ { inside = 0; kind = ""; close(file); next }
    inside { print > file }
' "$repo/README.md"
blocks() { find "$work/blocks" -name "*-$1" | sort; }
[[ $(blocks serve | wc -l) == 1 ]] || fail "README.md must mark exactly one '<!-- check: serve -->' block"
[[ $(blocks test | wc -l) == 1 ]] || fail "README.md must mark exactly one '<!-- check: test -->' block"

fresh_copy() {
    mkdir -p "$1"
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
        tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$1" -xf -
}

command -v curl >/dev/null || fail "needs curl (README's example request uses it)"
python3 -c "import socket; socket.socket().bind(('127.0.0.1', $port))" 2>/dev/null ||
    fail "port $port is taken; README's command serves there"

# --- set up + run, then the requests --------------------------------------------------------
copy="$work/run"
fresh_copy "$copy"
export SPLITVL_CACHE="$work/cache"  # a fresh machine: the demo checkpoint is built, not reused
started=$SECONDS
# A session of its own, so the SIGINT below reaches its whole process group, as Ctrl-C would.
setsid bash -c "cd '$copy' && exec bash -e '$(blocks serve)'" >"$work/serve.log" 2>&1 &
serve_pid=$!
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
    kill -0 "$serve_pid" 2>/dev/null || { tail -50 "$work/serve.log"; fail "the serve command exited"; }
    ((SECONDS - started < 900)) || { tail -50 "$work/serve.log"; fail "no /health after 900 s"; }
    sleep 1
done
log "set up + run: healthy after $((SECONDS - started)) s"

for block in $(find "$work/blocks" -name '*-request' -o -name '*-python' | sort); do
    case "$block" in
        *-request) (cd "$copy" && . .venv/bin/activate && bash -e "$block") ;;
        *-python) (cd "$copy" && . .venv/bin/activate && python "$block") ;;
    esac >"$work/out" 2>&1 || { cat "$work/out"; tail -30 "$work/serve.log"; fail "$(basename "$block") failed"; }
    log "$(basename "$block"): ok ($(tail -c 200 "$work/out" | tr '\n' ' '))"
done

kill -INT -- "-$serve_pid"
for _ in $(seq 60); do kill -0 "$serve_pid" 2>/dev/null || break; sleep 1; done
kill -0 "$serve_pid" 2>/dev/null && { tail -30 "$work/serve.log"; fail "still running 60 s after Ctrl-C"; }
wait "$serve_pid" || fail "the serve command exited with $? after Ctrl-C"
serve_pid=""
sleep 1
[[ -z $(leftovers) ]] || { leftovers; fail "processes left after Ctrl-C"; }
log "Ctrl-C: stopped cleanly, no process left ($((SECONDS - started)) s in all)"

# --- set up + test (collection only; see the top) -------------------------------------------
copy="$work/test"
fresh_copy "$copy"
started=$SECONDS
test_block=$(blocks test)
grep -q 'python -m pytest -q$' "$test_block" || fail "the test command no longer ends in 'python -m pytest -q'"
sed -i 's/python -m pytest -q$/python -m pytest -q --collect-only/' "$test_block"
(cd "$copy" && bash -e "$test_block") >"$work/out" 2>&1 || { tail -50 "$work/out"; fail "set up + test failed"; }
log "set up + test: $(grep -E '[0-9]+ tests? collected' "$work/out" | tail -1) in $((SECONDS - started)) s"
log "README.md: all commands passed"
