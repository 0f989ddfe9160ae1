#!/usr/bin/env bash
# The main job, end to end, on this machine: fwd follows a git repository and the host
# enforces what is committed there.
#
# It builds a throwaway lab that touches nothing of the host's own: a network namespace joined
# to the host by a veth pair (fwd attaches XDP to the host end only), a cgroup of its own for
# the egress programs and the lab's processes (never the root cgroup), a bpffs root of its
# own, and a bare git repository as the remote, seeded with examples/lab/. Then it shows a
# connection allowed, a pushed change that closes it (with the measured commit-to-enforced
# time), and a bad commit refused with its file:line while enforcement stays. Every step
# checks what it shows; the script exits non-zero on the first surprise and removes the lab on
# any exit (and what a killed run left behind, at start). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

NS=fw-demo                  # the namespace the clients live in
HOST_IF=fwdemo0             # host end of the veth pair: fwd's XDP ingress
PEER_IF=fwdemo1             # the namespace's end
HOST_IP=10.250.0.1          # the lab network is examples/lab/sets.yaml's lab-clients
PEER_IP=10.250.0.2
PREFIX=24
PORT=8080                   # the lab service: examples/lab/lab.yaml's `web` rule
LAB=/run/fw-demo            # remote, clone, fwd's state and status socket, logs
BPFFS=/sys/fs/bpf/fw-demo
LOCK=/run/fw-demo.lock
PIDFILE=/run/fw-demo.pid
CG=""                       # the lab's cgroup, under the cgroup v2 mount (found below)
FWD_PID=""

if [ -t 1 ]; then bold=$'\033[1m' dim=$'\033[2m' off=$'\033[0m'; else bold="" dim="" off=""; fi
say() { printf '\n%s== %s%s\n' "$bold" "$*" "$off"; }
# Shows a command (the built binaries by their names), then runs it.
run() { printf '%s$ %s%s\n' "$dim" "${*/#$target\/release\//}" "$off"; "$@"; }
pass() { printf '  ok: %s\n' "$*"; }
die() {
    printf 'demo: FAILED: %s\n' "$*" >&2
    exit 1
}

# Root is needed; a user with sudo is asked once (keeping PATH, so rustup's cargo is found).
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 ||
        die "the demo loads eBPF programs and makes a network namespace: run it as root"
    exec sudo env "PATH=$PATH" "HOME=$HOME" bash "$0" "$@"
fi

bash scripts/setup.sh
echo "building fwd and fwctl (release)..."
cargo build --release -q -p fwd -p fwctl
target="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
fwd="$target/release/fwd"
fwctl="$target/release/fwctl"

cgroot="$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)"
[ -n "$cgroot" ] || die "no cgroup v2 mount: fwd's egress programs need one"
CG="$cgroot/fw-demo"

# One demo at a time (the lab's names are fixed): the running one's pid is in $PIDFILE. A pid
# file rather than a lock held for the whole run, because a killed run's children would go on
# holding an inherited lock; the lock only makes the check and the write one step.
exec 9>"$LOCK"
flock -w 30 9 || die "cannot take $LOCK"
if other="$(cat "$PIDFILE" 2>/dev/null)" && [ "$other" != "$$" ] &&
    { tr '\0' ' ' <"/proc/$other/cmdline"; } 2>/dev/null | grep -q 'demo\.sh'; then
    die "another demo is running (pid $other)"
fi
echo $$ >"$PIDFILE"
exec 9>&-

# Git as the demo's "admin", whatever the user's own configuration says.
g() {
    GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null \
        GIT_AUTHOR_NAME="lab admin" GIT_AUTHOR_EMAIL="admin@lab.invalid" \
        GIT_COMMITTER_NAME="lab admin" GIT_COMMITTER_EMAIL="admin@lab.invalid" \
        git "$@"
}

# Stops the lab's processes (fwd first, by SIGTERM: it leaves enforcement in place), removes
# enforcement with `fwctl unload`, then the namespace, the veth pair, the cgroup and the lab
# folder. Safe to run when nothing or only part of it exists.
cleanup_lab() {
    if [ -d "$CG" ]; then
        local procs pid i
        procs="$(find "$CG" -name cgroup.procs -exec cat {} + 2>/dev/null || true)"
        for pid in $procs; do kill -TERM "$pid" 2>/dev/null || true; done
        for i in $(seq 50); do
            grep -q '^populated 0' "$CG/cgroup.events" 2>/dev/null && break
            sleep 0.1
        done
        if ! grep -q '^populated 0' "$CG/cgroup.events" 2>/dev/null; then
            echo 1 >"$CG/cgroup.kill" 2>/dev/null ||
                for pid in $(find "$CG" -name cgroup.procs -exec cat {} + 2>/dev/null); do
                    kill -KILL "$pid" 2>/dev/null || true
                done
            for i in $(seq 50); do
                grep -q '^populated 0' "$CG/cgroup.events" 2>/dev/null && break
                sleep 0.1
            done
        fi
    fi
    [ -n "$FWD_PID" ] && wait "$FWD_PID" 2>/dev/null || true
    if [ -e "$BPFFS" ]; then
        "$fwctl" unload --bpffs "$BPFFS" >/dev/null 2>&1 || true
        rm -rf "$BPFFS" 2>/dev/null || true
    fi
    ip netns del "$NS" 2>/dev/null || true
    ip link del "$HOST_IF" 2>/dev/null || true
    [ -d "$CG" ] && find "$CG" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    rm -rf "$LAB"
}

leftovers() {
    local l=()
    [ -e "$CG" ] && l+=("$CG")
    [ -e "$BPFFS" ] && l+=("$BPFFS")
    [ -e "/run/netns/$NS" ] && l+=("netns $NS")
    [ -e "/sys/class/net/$HOST_IF" ] && l+=("link $HOST_IF")
    [ -e "$LAB" ] && l+=("$LAB")
    echo "${l[*]}"
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$rc" -ne 0 ] && [ -s "$LAB/fwd.log" ]; then
        echo "--- the last lines of fwd's log ---" >&2
        tail -n 30 "$LAB/fwd.log" >&2 || true
    fi
    cleanup_lab
    [ "$(cat "$PIDFILE" 2>/dev/null)" = "$$" ] && rm -f "$PIDFILE"
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

left="$(leftovers)"
if [ -n "$left" ]; then
    echo "removing what an earlier run left: $left"
    cleanup_lab
    left="$(leftovers)"
    [ -z "$left" ] || die "cannot remove an earlier run's $left"
fi

# --- fwd's status, read the way a person would: `fwctl status --socket` -----------------------
SOCK="$LAB/run/status.sock"

# wait_status SECONDS PYTHON-EXPR [START-NS]: polls the status document (`d`) until the
# expression holds; prints the milliseconds since START-NS (default: now). Fails on timeout,
# printing the last document.
wait_status() {
    python3 - "$fwctl" "$SOCK" "$1" "$2" "${3:-}" <<'EOF'
import json, subprocess, sys, time
fwctl, sock, limit, expr, start = sys.argv[1:6]
start = int(start) if start else time.time_ns()
deadline = time.monotonic() + float(limit)
d = None
while True:
    r = subprocess.run([fwctl, "status", "--socket", sock, "--format", "json"],
                       capture_output=True, text=True)
    if r.returncode == 0:
        d = json.loads(r.stdout)
        try:
            if eval(expr, {"d": d}):
                print(f"{(time.time_ns() - start) / 1e6:.0f}")
                sys.exit(0)
        except (KeyError, TypeError, IndexError):
            pass
    if time.monotonic() > deadline:
        print(f"timed out after {limit} s waiting for fwd's status to show: {expr}", file=sys.stderr)
        print(json.dumps(d, indent=1)[:4000] if d else r.stderr, file=sys.stderr)
        sys.exit(1)
    time.sleep(0.01)
EOF
}

# jq-like: prints a Python expression over the status document `d`.
status_get() {
    "$fwctl" status --socket "$SOCK" --format json |
        python3 -c 'import json,sys; d=json.load(sys.stdin); v=eval(sys.argv[1]); print("" if v is None else v)' "$1"
}

# --- traffic from the namespace ----------------------------------------------------------------
# The first line of the lab service's answer to a request from the namespace; exit 124 when
# nothing answers within $1 seconds (a dropped SYN), 1 when the connection is refused.
fetch() {
    ip netns exec "$NS" timeout "$1" bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "GET / HTTP/1.0\r\nHost: lab\r\n\r\n" >&3
        IFS= read -r line <&3 && printf "%s\n" "${line%"$2"}"' "$HOST_IP" "$2" $'\r'
}

expect_served() {
    local line
    printf '%s$ ip netns exec %s: GET http://%s:%s/%s\n' "$dim" "$NS" "$HOST_IP" "$PORT" "$off"
    line="$(fetch 5 "$PORT")" || die "the lab service did not answer from the namespace ($1)"
    [[ "$line" == "HTTP/1."?" 200 "* ]] || die "unexpected answer: $line"
    pass "$line: $1"
}

expect_dropped() {
    local port=$1 why=$2 rc=0 out
    printf '%s$ ip netns exec %s: connect %s:%s%s\n' "$dim" "$NS" "$HOST_IP" "$port" "$off"
    out="$(fetch 2 "$port")" || rc=$?
    case "$rc" in
        124) pass "no answer within 2 s (the SYN was dropped): $why" ;;
        0) die "port $port answered ($out); expected it dropped: $why" ;;
        *) die "port $port refused the connection (a reset, so the SYN got through); expected it dropped: $why" ;;
    esac
}

expect_ping() {
    printf '%s$ ip netns exec %s ping -c 1 %s%s\n' "$dim" "$NS" "$HOST_IP" "$off"
    ip netns exec "$NS" ping -c 1 -W 2 "$HOST_IP" >/dev/null || die "ping from the namespace failed ($1)"
    pass "ping answered: $1"
}

# ================================================================================================
say "1. The lab policy (examples/lab/), checked the way CI checks it"
run "$fwctl" validate examples/lab/
run "$fwctl" test examples/lab/
run "$fwctl" explain examples/lab/ --host lab-1 --label role=lab --ingress --from "$PEER_IP" --proto tcp --port "$PORT"

# ================================================================================================
say "2. A throwaway lab: namespace $NS, veth $HOST_IF <-> $PEER_IF, cgroup $CG, bpffs $BPFFS, $LAB"
if [ -n "$(ip -4 -o addr show to "$HOST_IP/$PREFIX")" ]; then
    die "$HOST_IP/$PREFIX is already in use on this host; the lab needs that network"
fi
mkdir -p "$LAB" "$LAB/www"
chmod 700 "$LAB"
# The cgroup's two children: `enforced` is where fwd attaches the egress programs (the lab
# service runs there); `daemon` holds fwd. Cleaning up kills whatever is left in the tree.
mkdir -p "$CG/enforced" "$CG/daemon"
ip netns add "$NS"
ip link add "$HOST_IF" type veth peer name "$PEER_IF" netns "$NS"
ip addr add "$HOST_IP/$PREFIX" dev "$HOST_IF"
ip link set "$HOST_IF" up
ip -n "$NS" addr add "$PEER_IP/$PREFIX" dev "$PEER_IF"
ip -n "$NS" link set "$PEER_IF" up
ip -n "$NS" link set lo up
pass "veth pair up: $PEER_IF ($PEER_IP) in $NS, $HOST_IF ($HOST_IP) on the host"

echo "hello from the lab host" >"$LAB/www/index.html"
bash -c 'echo $$ >"$1/cgroup.procs" && exec python3 -m http.server "$2" --bind "$3" --directory "$4"' \
    _ "$CG/enforced" "$PORT" "$HOST_IP" "$LAB/www" >"$LAB/http.log" 2>&1 &
for _ in $(seq 100); do
    timeout 1 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST_IP" "$PORT" 2>/dev/null && break
    sleep 0.1
done
timeout 1 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST_IP" "$PORT" 2>/dev/null ||
    die "the lab service did not start (see $LAB/http.log)"
pass "lab service: python3 -m http.server on $HOST_IP:$PORT, in $CG/enforced"
expect_served "before fwd runs, nothing filters"

# The remote: a bare repository, seeded from an admin's clone with examples/lab/ as policies/.
g init -q --bare -b main "$LAB/remote.git"
g init -q -b main "$LAB/admin"
g -C "$LAB/admin" remote add origin "file://$LAB/remote.git"
mkdir -p "$LAB/admin/policies"
cp examples/lab/*.yaml "$LAB/admin/policies/"
g -C "$LAB/admin" add -A
g -C "$LAB/admin" commit -q -m "lab: web on 8080 for the lab network, ping"
g -C "$LAB/admin" push -q origin main
seed="$(g -C "$LAB/admin" rev-parse HEAD)"
pass "remote file://$LAB/remote.git, main at ${seed:0:12} (policies/: $(echo $(ls "$LAB/admin/policies")))"

metrics_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat >"$LAB/fwd.yaml" <<EOF
source:
  url: file://$LAB/remote.git
  ref: main
  path: policies
  interval: 10s          # a file:// remote is also watched: a push is seen at once
host: {name: lab-1, labels: {role: lab}}
interfaces: [$HOST_IF]
cgroup: $CG/enforced
bpffs: $BPFFS
state: $LAB/state
status: $SOCK
metrics: 127.0.0.1:$metrics_port
EOF
run "$fwd" --check-config "$LAB/fwd.yaml" | sed 's/^/  /'

# ================================================================================================
say "3. fwd follows the remote"
printf '%s$ fwd --config %s &%s\n' "$dim" "$LAB/fwd.yaml" "$off"
bash -c 'echo $$ >"$1/cgroup.procs" && exec "$2" --config "$3"' \
    _ "$CG/daemon" "$fwd" "$LAB/fwd.yaml" >"$LAB/fwd.log" 2>&1 &
FWD_PID=$!
ms="$(wait_status 60 "d['applied']['commit'] == '$seed'")"
pass "fwd enforces ${seed:0:12} ${ms} ms after it started"
run "$fwctl" status --socket "$SOCK"
expect_served "tcp/$PORT from the lab network is allowed (lab/web)"
expect_ping "icmp echo-request is allowed (lab/ping)"
expect_dropped 22 "tcp/22 is not allowed: ingress default deny"

# ================================================================================================
say "4. A policy change: close the web service for maintenance, then push"
cat >"$LAB/admin/policies/maintenance.yaml" <<'EOF'
apiVersion: fw/v1
kind: Policy
metadata:
  name: maintenance
  description: The web service is closed while it is being upgraded.
spec:
  hosts: {labels: {role: lab}}
  ingress:
    - name: web-closed
      action: deny
      from: [{set: lab-clients}]
      proto: tcp
      ports: [8080]
EOF
sed -i 's/port: 8080, expect: allow/port: 8080, expect: deny/' "$LAB/admin/policies/tests.yaml"
grep -q 'port: 8080, expect: deny' "$LAB/admin/policies/tests.yaml" || die "could not update the lab test"
run "$fwctl" test "$LAB/admin/policies/" | tail -n 1
g -C "$LAB/admin" add -A
g -C "$LAB/admin" commit -q -m "maintenance: close web to the lab network"
good="$(g -C "$LAB/admin" rev-parse HEAD)"
printf '%s$ git push origin main   # %s%s\n' "$dim" "${good:0:12}" "$off"
t0="$(date +%s%N)"
g -C "$LAB/admin" push -q origin main
pushed_ms=$((($(date +%s%N) - t0) / 1000000))
ms="$(wait_status 20 "d['applied']['commit'] == '$good'" "$t0")"
read -r seen_ms author_ms < <(status_get "'%.1f %s' % (d['applied']['detect_to_enforced_ms'] or 0, d['applied']['commit_to_enforced_ms'])")
pass "fwd enforces ${good:0:12}"
echo
echo "  commit-to-enforced: ${ms} ms, measured here from just before the push to fwctl status showing it"
echo "                      enforced (the push itself took ${pushed_ms} ms)"
echo "  fwd's own figures:  ${seen_ms} ms from seeing the new commit to enforcing it;"
echo "                      ${author_ms} ms from the commit's author time (whole seconds) to enforcing it"
echo
run "$fwctl" status --socket "$SOCK" | sed -n '1,6p'
expect_dropped "$PORT" "tcp/$PORT is now denied (maintenance/web-closed)"
expect_ping "ping is untouched by the change"
wait_status 5 "any(r['name'] == 'maintenance/web-closed' and r['packets'] > 0 for r in d['rules'])" >/dev/null ||
    die "the counter of maintenance/web-closed did not count the dropped SYNs"
packets="$(status_get "[r['packets'] for r in d['rules'] if r['name'] == 'maintenance/web-closed'][0]")"
pass "fwd's counters: maintenance/web-closed dropped $packets packets"

# ================================================================================================
say "5. A bad commit: a mistyped port, pushed past CI"
sed -i 's/ports: \[8080\]/ports: [8080, 84430]/' "$LAB/admin/policies/maintenance.yaml"
badline="$(grep -n '84430' "$LAB/admin/policies/maintenance.yaml" | cut -d: -f1)"
[ -n "$badline" ] || die "could not make the bad commit"
if run "$fwctl" validate "$LAB/admin/policies/" 2>&1 | sed 's/^/  /'; then :; fi
"$fwctl" validate "$LAB/admin/policies/" >/dev/null 2>&1 && die "fwctl validate accepted the bad policy"
g -C "$LAB/admin" commit -q -am "maintenance: also close 8443 (typo)"
bad="$(g -C "$LAB/admin" rev-parse HEAD)"
printf '%s$ git push origin main   # %s%s\n' "$dim" "${bad:0:12}" "$off"
g -C "$LAB/admin" push -q origin main
wait_status 20 "d['last_reconcile']['commit'] == '$bad' and d['last_reconcile']['outcome'] == 'rejected'" >/dev/null ||
    die "fwd did not report the bad commit as rejected"
run "$fwctl" status --socket "$SOCK" | sed -n '1,8p'
where="$(status_get "[f\"{p['file']}:{p['line']}\" for p in d['last_error']['problems']][0]")"
[ "$where" = "policies/maintenance.yaml:$badline" ] ||
    die "status names $where for the bad commit, expected policies/maintenance.yaml:$badline"
pass "rejected, with its file:line in status: $where"
applied="$(status_get "d['applied']['commit']")"
[ "$applied" = "$good" ] || die "the applied commit changed to $applied"
pass "the applied commit is still ${good:0:12}"
expect_dropped "$PORT" "the last good policy keeps enforcing"
expect_ping "and ping still works"

# ================================================================================================
say "6. fwd's metrics (GET http://127.0.0.1:$metrics_port/metrics)"
metrics="$(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
    "http://127.0.0.1:$metrics_port/metrics")"
grep -E '^fwd_reconciles_total|^fwd_commit_to_enforced_seconds_(count|sum)' <<<"$metrics" | sed 's/^/  /'
grep -q '^fwd_reconciles_total{outcome="applied"} 2$' <<<"$metrics" || die "expected 2 applied reconciles"
grep -q '^fwd_reconciles_total{outcome="rejected"} 1$' <<<"$metrics" || die "expected 1 rejected reconcile"
pass "two commits applied, one rejected"

# ================================================================================================
say "7. Clean-up: stop fwd, fwctl unload, remove the lab"
kill -TERM "$FWD_PID"
wait "$FWD_PID" || die "fwd exited with status $? on SIGTERM"
FWD_PID=""
pass "fwd stopped on SIGTERM"
expect_dropped "$PORT" "enforcement stays after fwd stops"
run "$fwctl" unload --bpffs "$BPFFS" | tail -n 1
expect_served "after fwctl unload the service answers again"
cleanup_lab
left="$(leftovers)"
[ -z "$left" ] || die "left behind: $left"
pass "nothing left behind"
echo "demo: ok"
