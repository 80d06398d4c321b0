#!/usr/bin/env bash
# The portable CPU wheels (issue #18): manylinux_2_28 (glibc 2.28+: RHEL 8, Debian 10, Ubuntu
# 18.10 and newer), abi3 for CPython 3.10+, x86_64 and aarch64 (cross-linked with zig), plus the
# sdist; each checked with `auditwheel show`. Output in dist-wheels/.
#   bash scripts/build_wheels.sh [x86_64|aarch64|all]
# Compiled for the plain x86-64 baseline (no target-cpu flag); the kernels choose AVX-512 /
# AVX2+F16C / portable loops at run time (`glm2rs doctor` lists what this CPU offers).
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"
python3 -m pip install -q "maturin>=1.7,<2" ziglang auditwheel
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-zig}"
unset RUSTFLAGS
rm -rf dist-wheels
build() {
    maturin build --release --zig --compatibility manylinux_2_28 --target "$1" -o dist-wheels
}
case "$which" in
    x86_64) build x86_64-unknown-linux-gnu ;;
    aarch64) rustup target add aarch64-unknown-linux-gnu && build aarch64-unknown-linux-gnu ;;
    all)
        build x86_64-unknown-linux-gnu
        rustup target add aarch64-unknown-linux-gnu && build aarch64-unknown-linux-gnu
        maturin sdist -o dist-wheels
        ;;
    *) echo "usage: $0 [x86_64|aarch64|all]" >&2; exit 2 ;;
esac
for w in dist-wheels/*.whl; do
    auditwheel show "$w" | grep -q 'platform tag: "manylinux_2_28' || { auditwheel show "$w"; exit 1; }
    echo "ok: $w"
done
