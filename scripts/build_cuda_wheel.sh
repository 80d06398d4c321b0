#!/usr/bin/env bash
# Build the CUDA (sm_90: H100/H200) abi3 wheel on this CPU-only machine with nvcc 13.0 from PyPI.
# The wheel lands in dist-cuda/; with --tests also the GPU kernel tests (dist-cuda/cuda-decode-test);
# with --bench the criterion kernel benches
# (dist-cuda/kernels-bench, run there as `dist-cuda/kernels-bench --bench gpu_`). On the device: pip install it; libcudart.so.13 must be loadable
# (the nvidia-cuda-runtime wheel provides it; glm2rs/__init__.py preloads it when present).
set -euo pipefail
cd "$(dirname "$0")/.."
# nvcc's own pieces must be the same 13.0 release: newer nvidia-nvvm / nvidia-cuda-crt (pulled in by
# default) emit PTX 9.5 that ptxas 13.0 rejects ("Unsupported .version 9.5").
python3 -m pip install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 "maturin>=1.7,<2"
SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
C="$SP/nvidia/cu13"
ln -sf "$C/lib/libcudart.so.13" "$C/lib/libcudart.so"   # candle-kernels links -lcudart
ln -sfn "$C/lib" "$C/lib64"
export PATH="$C/bin:$PATH" CUDA_ROOT="$C" CUDA_PATH="$C" NVCC="$C/bin/nvcc" CUDA_COMPUTE_CAP=90
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-cuda}"
# candle links the CUDA libraries dynamically; this machine has no driver: link against stubs
# that carry the real sonames (the GPU machine's libraries are bound at load time).
# (The stubs go beside libcudart in the nvidia wheel's lib folder, already on the link path.)
cargo fetch -q
python3 scripts/cuda_link_stubs.py "$C/lib"
export RUSTFLAGS="-L $C/lib"
rm -rf dist-cuda
maturin build --release --features cuda,python,server --auditwheel skip -o dist-cuda
if [ "${1:-}" = "--tests" ]; then
    # the GPU kernel tests (tests/cuda_decode.rs), run there as dist-cuda/cuda-decode-test
    exe=$(cargo test --release --features cuda --test cuda_decode --no-run --message-format=json \
        | python3 -c "import sys, json; print([m['executable'] for m in map(json.loads, sys.stdin) if m.get('executable')][-1])")
    cp "$exe" dist-cuda/cuda-decode-test
fi
if [ "${1:-}" = "--bench" ]; then
    exe=$(cargo bench --features cuda --bench kernels --no-run --message-format=json \
        | python3 -c "import sys, json; print([m['executable'] for m in map(json.loads, sys.stdin) if m.get('executable')][-1])")
    cp "$exe" dist-cuda/kernels-bench
fi
