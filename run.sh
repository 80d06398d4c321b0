#!/usr/bin/env bash
# Set up glm2rs (build and install the wheel) and run the main job: stream a chat answer.
#   ./run.sh [MODEL_DIR_OR_HUB_ID] [QUESTION]
# Without arguments it answers on the tiny reference checkpoint (random weights: gibberish text).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install -q --disable-pip-version-check "maturin>=1.7,<2" "numpy>=1.22" "huggingface_hub>=0.20"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
rm -rf dist
maturin build --release -o dist
python3 -m pip install -q --disable-pip-version-check --force-reinstall --no-deps dist/glm2rs-*.whl
FIXTURES="${GLM2RS_FIXTURES:-../shared/fixtures/tiny-glm2}"
python3 examples/python/stream.py --model "${1:-$FIXTURES/model}" --question "${2:-你好}" --max-new-tokens 48
