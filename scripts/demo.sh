#!/usr/bin/env bash
# The main job on the embedded example policy repo (policies/): validate it, run its policy
# tests, compile it for a web host, and explain two decisions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -q -p fwctl
fwctl="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/fwctl"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$fwctl" validate policies/
step "$fwctl" test policies/
step "$fwctl" compile policies/ --host web-1 --label role=web --format table | head -n 30
step "$fwctl" explain policies/ --host web-1 --label role=web --ingress --from 192.0.2.1 --proto tcp --port 443
step "$fwctl" explain policies/ --host db-1 --label role=db --egress --to 10.0.7.9 --proto tcp --port 443 \
    --workload system.slice/pgbackrest.service
# A broken policy is rejected with file:line:column; fwctl exits 1.
broken=$(mktemp -d)
trap 'rm -rf "$broken"' EXIT
cp -r policies/. "$broken/"
sed -i 's/ports: \[5432\]/ports: [5432, 70000]/' "$broken/db.yaml"
printf '\n\033[1m$ %s\033[0m\n' "fwctl validate <policies with a bad port>"
if "$fwctl" validate "$broken"; then
    echo "demo: expected the broken policy to be rejected" >&2
    exit 1
fi
echo "demo: ok"
