#!/usr/bin/env bash
# The whole test suite; CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
cargo test --workspace
cargo run -q -p fwctl -- validate policies/
cargo run -q -p fwctl -- test policies/
# The benchmark suite in quick mode (a few minutes; release builds), written to a temporary
# folder so the checked-in report is not replaced: every part runs at its real sizes against
# the kernel, nftables and iptables, and both output files must parse. No timing is asserted:
# a CI machine's figures are context, not a result.
bench_out=$(mktemp -d)
trap 'rm -rf "$bench_out"' EXIT
cargo xtask bench --quick --out "$bench_out"
