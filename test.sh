#!/usr/bin/env bash
# Run every test: Rust unit and golden parity tests, then the pytest suite on the built wheel.
set -euo pipefail
cd "$(dirname "$0")"
. scripts/python_env.sh
"$PY" -m pip install -q --disable-pip-version-check "maturin>=1.7,<2" pytest "numpy>=1.22" \
    "huggingface_hub>=0.20" "safetensors>=0.4" "tokenizers>=0.15" pexpect "openai>=1.40" websocket-client pillow \
    "ray[serve]>=2.49" sentencepiece "gguf>=0.17"
# llama.cpp itself, for the GGUF interop tests (builds from source: a few minutes on 2 cores)
CMAKE_POLICY_VERSION_MINIMUM=3.5 "$PY" -m pip install -q --disable-pip-version-check "llama-cpp-python==0.3.36"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo test --release --features server
# a service depending on the crate as Rust users do (README "Rust") keeps compiling
cargo build --release --manifest-path examples/service/Cargo.toml
rm -rf dist
"$PY" -m maturin build --release -o dist
"$PY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps dist/glm2rs-*.whl
"$PY" -m pytest -q tests
