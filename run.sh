#!/usr/bin/env bash
# Set up glm2rs (build and install the wheel) and run the main job: stream a chat answer.
#   ./run.sh [MODEL_DIR_OR_HUB_ID] [QUESTION]
# Without arguments it answers on the tiny reference checkpoint (random weights: gibberish text).
set -euo pipefail
cd "$(dirname "$0")"
FIXTURES="${GLM2RS_FIXTURES:-../shared/fixtures/tiny-glm2}"
MODEL="${1:-$FIXTURES/model}"
# before a long build: is there a model to run?
if [ -z "${1:-}" ] && [ ! -d "$MODEL" ]; then
    echo "error: no model given and the reference checkpoint $MODEL is absent." >&2
    echo "  ./run.sh MODEL_DIR_OR_HUB_ID [QUESTION]   e.g. ./run.sh THUDM/chatglm2-6b 你好" >&2
    echo "  (or set GLM2RS_FIXTURES to the tiny-glm2 fixture directory)" >&2
    exit 2
fi
. scripts/python_env.sh
"$PY" -m pip install -q --disable-pip-version-check "maturin>=1.7,<2" "numpy>=1.22" "huggingface_hub>=0.20"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
rm -rf dist
"$PY" -m maturin build --release -o dist
"$PY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps dist/glm2rs-*.whl
"$PY" examples/python/stream.py --model "$MODEL" --question "${2:-你好}" --max-new-tokens 48
