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
