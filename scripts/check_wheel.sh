#!/usr/bin/env bash
# Check a built CPU wheel as a user gets it (issue #18): its platform tag (auditwheel), then an
# install into a fresh virtual environment with no Rust toolchain on PATH, and the tiny fixture
# streamed, chatted with and served over HTTP from that environment (scripts/smoke_wheel.py).
#   bash scripts/check_wheel.sh [DIST]      (default dist/; needs GLM2RS_FIXTURES or ../shared)
set -euo pipefail
cd "$(dirname "$0")/.."
DIST="${1:-dist}"
FIXTURES="${GLM2RS_FIXTURES:-../shared/fixtures/tiny-glm2}"
wheels=("$DIST"/glm2rs-*.whl)
if [ ! -e "${wheels[0]}" ] || [ "${#wheels[@]}" -ne 1 ]; then
    echo "error: expected exactly one glm2rs wheel in $DIST, found: ${wheels[*]}" >&2
    exit 1
fi
WHEEL="${wheels[0]}"
if [ ! -d "$FIXTURES/model" ]; then
    echo "error: the tiny-glm2 fixture is not at $FIXTURES (set GLM2RS_FIXTURES)" >&2
    exit 1
fi
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" -m pip install -q --disable-pip-version-check auditwheel
tag=$("$PY" -m auditwheel show "$WHEEL" | tr '\n' ' ' | grep -o 'platform tag: "[^"]*"' | head -1 | cut -d'"' -f2)
echo "wheel: $(basename "$WHEEL"), platform tag (auditwheel): ${tag:-none}"
case "$tag" in
    manylinux_*) ;;
    *) echo "error: $WHEEL is not a manylinux wheel" >&2; exit 1 ;;
esac
ENV=$(mktemp -d /tmp/glm2rs-wheel-check.XXXXXX)
trap 'rm -rf "$ENV"' EXIT
"$PY" -m venv "$ENV"
# a PATH without ~/.cargo/bin: the wheel must not need a toolchain (smoke_wheel.py fails if cargo
# or rustc is still reachable)
CLEAN_PATH="$ENV/bin:/usr/local/bin:/usr/bin:/bin"
env -i HOME="$HOME" PATH="$CLEAN_PATH" "$ENV/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL"
env -i HOME="$HOME" PATH="$CLEAN_PATH" RUSTUP_TOOLCHAIN=none GLM2RS_FIXTURES="$(cd "$FIXTURES" && pwd)" \
    "$ENV/bin/python" scripts/smoke_wheel.py
