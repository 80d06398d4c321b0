#!/usr/bin/env bash
# Build release wheels (issue #18).
#   bash scripts/build_wheel.sh                 the CPU wheel of this machine's architecture into dist/
#   bash scripts/build_wheel.sh --all           CPU wheels for x86_64 and aarch64 and the sdist into dist/
#   bash scripts/build_wheel.sh --cuda [--tests | --bench]
#                                               the CUDA wheel into dist-cuda/ (see below)
#
# CPU wheels: manylinux_2_28 (glibc 2.28+: RHEL 8, Debian 10, Ubuntu 18.10 and newer), abi3 for
# CPython 3.10+, linked with zig (aarch64 cross-built); each checked with `auditwheel show`.
# Compiled for the plain x86-64 / aarch64 baseline (no target-cpu flag); the kernels choose AVX-512 /
# AVX2+F16C / portable loops at run time (`glm2rs doctor` lists what a CPU offers).
# `scripts/check_wheel.sh dist` then installs one into a fresh venv and smoke-tests it.
#
# CUDA wheel: built on a machine without a GPU with nvcc 13.0 from PyPI, for every GPU from compute
# capability 8.0: glm2rs's kernels as machine code for sm_80/86/89/90a (A100, RTX 30, RTX 40/L4,
# H100/H200 with the wgmma prompt kernel) plus PTX for compute_90 (later GPUs), loaded without JIT;
# candle's kernels likewise as machine code for those GPUs, PTX for compute_90 (candle patched for
# this build only: scripts/candle_fatbin.sh), so a new process JIT-compiles nothing (GLM2RS_CUDA_ARCHS
# and CUDA_COMPUTE_CAP, when set, choose other targets: e.g. GLM2RS_CUDA_ARCHS=90a CUDA_COMPUTE_CAP=90
# for Hopper alone, in target-cuda). With --tests also the GPU
# kernel tests (dist-cuda/cuda-decode-test, tests/cuda_decode.rs); with --bench the criterion kernel
# benches (dist-cuda/kernels-bench, run there as `dist-cuda/kernels-bench --bench gpu_`). On the GPU
# machine: pip install it; libcudart.so.13, cuBLAS 13 and cuRAND must be loadable (the
# nvidia-cuda-runtime, nvidia-cublas and nvidia-curand wheels provide them; glm2rs/__init__.py
# preloads libcudart when present).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"

cpu() {
    python3 -m pip install -q "maturin>=1.7,<2" ziglang auditwheel
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-zig}"
    unset RUSTFLAGS
    rm -rf dist
    build() { maturin build --release --zig --compatibility manylinux_2_28 --target "$1" -o dist; }
    case "$(uname -m)" in
        x86_64) here=x86_64-unknown-linux-gnu other=aarch64-unknown-linux-gnu ;;
        aarch64) here=aarch64-unknown-linux-gnu other=x86_64-unknown-linux-gnu ;;
        *) echo "error: no CPU wheel build for $(uname -m)" >&2; exit 1 ;;
    esac
    build "$here"
    if [ "$mode" = "--all" ]; then
        rustup target add "$other" && build "$other"
        maturin sdist -o dist
    fi
    for w in dist/*.whl; do
        python3 -m auditwheel show "$w" | tr '\n' ' ' | grep -q 'platform tag: "manylinux_2_28' \
            || { python3 -m auditwheel show "$w"; exit 1; }
        echo "ok: $w (manylinux_2_28)"
    done
}

cuda() {
    # nvcc's own pieces must be the same 13.0 release: newer nvidia-nvvm / nvidia-cuda-crt (pulled
    # in by default) emit PTX 9.5 that ptxas 13.0 rejects ("Unsupported .version 9.5").
    python3 -m pip install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
        nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 "maturin>=1.7,<2"
    SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
    C="$SP/nvidia/cu13"
    ln -sf "$C/lib/libcudart.so.13" "$C/lib/libcudart.so"   # candle-kernels links -lcudart
    ln -sfn "$C/lib" "$C/lib64"
    export PATH="$C/bin:$PATH" CUDA_ROOT="$C" CUDA_PATH="$C" NVCC="$C/bin/nvcc"
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}" GLM2RS_CUDA_ARCHS="${GLM2RS_CUDA_ARCHS:-80,86,89,90a}"
    # one target folder per candle kernel target (changing it rebuilds candle's kernels)
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-cuda$([ "$CUDA_COMPUTE_CAP" = 90 ] || echo "-$CUDA_COMPUTE_CAP")}"
    # candle links the CUDA libraries dynamically; this machine has no driver: link against stubs
    # that carry the real sonames (the GPU machine's libraries are bound at load time). The stubs go
    # beside libcudart in the nvidia wheel's lib folder, already on the link path.
    cargo fetch -q
    python3 scripts/cuda_link_stubs.py "$C/lib"
    export RUSTFLAGS="-L $C/lib"
    # candle's kernels as machine code too (scripts/candle_fatbin.sh): the same targets, `a` dropped
    export CANDLE_KERNELS_FATBIN_ARCHS="${CANDLE_KERNELS_FATBIN_ARCHS:-$(echo "$GLM2RS_CUDA_ARCHS" \
        | tr ',' '\n' | sed 's/[af]$//' | sort -nu | paste -sd,)}"
    local patched
    mapfile -t patched < <(bash scripts/candle_fatbin.sh "$CARGO_TARGET_DIR/candle-fatbin")
    [ "${#patched[@]}" = 4 ] || { echo "error: scripts/candle_fatbin.sh failed" >&2; exit 1; }
    # the patch points Cargo.lock at the copies; the committed lock file stays as it was
    cp Cargo.lock "$CARGO_TARGET_DIR/Cargo.lock.orig"
    trap 'cp "$CARGO_TARGET_DIR/Cargo.lock.orig" Cargo.lock' EXIT
    rm -rf dist-cuda
    maturin build --release --features cuda,python,server --auditwheel skip "${patched[@]}" -o dist-cuda
    local exe
    case "${1:-}" in
        --tests)
            exe=$(cargo test --release --features cuda "${patched[@]}" --test cuda_decode --no-run --message-format=json \
                | python3 -c "import sys, json; print([m['executable'] for m in map(json.loads, sys.stdin) if m.get('executable')][-1])")
            cp "$exe" dist-cuda/cuda-decode-test ;;
        --bench)
            exe=$(cargo bench --features cuda "${patched[@]}" --bench kernels --no-run --message-format=json \
                | python3 -c "import sys, json; print([m['executable'] for m in map(json.loads, sys.stdin) if m.get('executable')][-1])")
            cp "$exe" dist-cuda/kernels-bench ;;
        "") ;;
        *) echo "usage: $0 --cuda [--tests | --bench]" >&2; exit 2 ;;
    esac
}

case "$mode" in
    "" | --all) cpu ;;
    --cuda) shift; cuda "$@" ;;
    *) echo "usage: $0 [--all | --cuda [--tests | --bench]]" >&2; exit 2 ;;
esac
