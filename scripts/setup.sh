#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine with rustup. Idempotent:
# each step checks first, so running it again costs a second.
set -euo pipefail

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: '$*' needs root; run this script as root or install it yourself" >&2
        exit 1
    fi
}

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found; install Rust with rustup first (https://rustup.rs)" >&2
    exit 1
fi

# rustfmt and clippy run in the test suite.
for component in rustfmt clippy; do
    if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
        rustup component add "$component"
    fi
done

# Debian packages: a C compiler for -sys crates and pkg-config.
missing=()
for pkg in gcc pkg-config; do
    command -v "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    need_root apt-get install "${missing[@]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
echo "setup: ok"
