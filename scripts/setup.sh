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

# Debian packages, as "command:package": a C compiler for -sys crates and for linking
# bpf-linker, pkg-config, and for the privileged tests and the demo bpftool (inspecting
# programs and maps), iproute2 (network namespaces, veth pairs, attaching XDP) and ping
# (real ICMP between namespaces); for the benchmark suite (`cargo xtask bench`) nftables and
# iptables (the engines ours is compared with) and ethtool (GRO on the bench's veth); fwd's
# tests and the demo make real git repositories (git) and run fwd with only its systemd unit's
# capabilities (setpriv, from util-linux); python3 serves the demo's web service.
missing=()
for pair in gcc:gcc pkg-config:pkg-config bpftool:bpftool ip:iproute2 ping:iputils-ping \
    nft:nftables iptables:iptables ethtool:ethtool git:git setpriv:util-linux python3:python3; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
# Libraries without a command: OpenSSL's headers for fwd's https git transport (git2 links the
# system OpenSSL; libgit2 itself and libssh2 are built from source).
for package in libssl-dev; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    need_root apt-get install "${missing[@]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# --- The eBPF toolchain ---------------------------------------------------------------------
# crates/fw-loader/build.rs builds the kernel crate (crates/fw-ebpf) with aya-build: nightly
# rustc for bpfel-unknown-none with -Z build-std=core (which needs the rust-src component),
# linked by bpf-linker.
if ! rustup toolchain list | grep -q '^nightly'; then
    rustup toolchain install nightly --profile minimal --component rust-src
elif ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    rustup component add rust-src --toolchain nightly
fi

# bpf-linker must link with the same LLVM that nightly rustc writes its bitcode with, so it is
# built against nightly's own libLLVM. Its build looks for LLVM under LLVM_PREFIX (lib/libLLVM.so)
# and records LLVM_PREFIX/lib as the binary's rpath, so the prefix is a stable folder holding
# two symlinks into the nightly sysroot: the unversioned name (for linking) and the versioned
# one (what the binary loads). Root uses /opt; others their data directory; FW_BPF_LLVM_PREFIX
# overrides both.
if [ -n "${FW_BPF_LLVM_PREFIX:-}" ]; then
    llvm_prefix="$FW_BPF_LLVM_PREFIX"
elif [ "$(id -u)" -eq 0 ]; then
    llvm_prefix=/opt/fw-bpf-llvm
else
    llvm_prefix="${XDG_DATA_HOME:-$HOME/.local/share}/fw-bpf-llvm"
fi
nightly_sysroot="$(rustc +nightly --print sysroot)"
libllvm="$(find "$nightly_sysroot/lib" -maxdepth 1 -name 'libLLVM.so.*-rust-*' | sort | tail -n 1)"
if [ -z "$libllvm" ]; then
    echo "setup: no libLLVM.so.* in $nightly_sysroot/lib; cannot build bpf-linker" >&2
    exit 1
fi
mkdir -p "$llvm_prefix/lib"
ln -sfn "$libllvm" "$llvm_prefix/lib/libLLVM.so"
ln -sfn "$libllvm" "$llvm_prefix/lib/$(basename "$libllvm")"

# Works = runs, and loads the libLLVM of today's nightly (after a nightly update the old
# library is gone or another one: rebuild).
bpf_linker_works() {
    local bin
    bin="$(command -v bpf-linker 2>/dev/null)" || return 1
    bpf-linker --version >/dev/null 2>&1 || return 1
    local loaded
    loaded="$(ldd "$bin" 2>/dev/null | awk '/libLLVM/ {print $3; exit}')"
    [ -n "$loaded" ] && [ "$(readlink -f "$loaded")" = "$(readlink -f "$libllvm")" ]
}
if ! bpf_linker_works; then
    # libLLVM.so.22.1-rust-... -> 22: bpf-linker has one feature per LLVM major version.
    llvm_major="$(basename "$libllvm" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')"
    LLVM_PREFIX="$llvm_prefix" cargo install bpf-linker --version '^0.13' --force \
        --no-default-features --features "llvm-$llvm_major"
    if ! bpf_linker_works; then
        echo "setup: bpf-linker was installed but does not load $libllvm" >&2
        exit 1
    fi
fi

# The data plane pins its programs and maps under /sys/fs/bpf (fwctl apply, the privileged
# tests): mount the BPF filesystem there when it is not (some containers and minimal VMs do not).
if [ "$(id -u)" -eq 0 ] && [ "$(stat -f -c %T /sys/fs/bpf 2>/dev/null)" != "bpf_fs" ]; then
    mkdir -p /sys/fs/bpf 2>/dev/null || true
    mount -t bpf bpf /sys/fs/bpf
fi
echo "setup: ok"
