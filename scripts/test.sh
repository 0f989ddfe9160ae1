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
# The benchmark suite with tiny sizes (seconds; a debug build, like the tests): every part
# runs and both output files parse.
# No timing is asserted; the figures of a smoke run mean nothing.
cargo run -q -p xtask -- bench --smoke
