#!/bin/sh
# Every test of kvm-dirty-shim, as CI runs it (README: "Run every test").
# Needs /dev/kvm (read-write) and a Rust toolchain; nothing else.
set -eu
cd "$(dirname "$0")/.."

echo "== format and lints"
cargo fmt --check
cargo clippy --all-targets -- -D warnings

echo "== cargo test (real /dev/kvm; the checked-in header must match the code)"
# KDS_HEADER_CHECK=1: build.rs leaves include/ alone, so tests/header.rs
# fails on a stale header instead of the build silently refreshing it.
KDS_HEADER_CHECK=1 timeout 1200 cargo test --release

echo "== demo (1 s per mode; exits non-zero on any lost page)"
timeout 300 cargo run --release --example demo 1 > target/demo.out
tail -n 3 target/demo.out
