# Sourced by run.sh and test.sh: pick the Python to install into, and check the toolchain first.
# - Inside a virtual environment, or with a Python that lets pip install (pyenv, conda, ...): that one.
# - A system Python that refuses pip installs (PEP 668: Debian, Ubuntu, Fedora's "externally
#   managed" marker): a virtual environment in .venv, made once and reused.
# Sets PY (the interpreter to use).
PY=python3
if ! command -v python3 >/dev/null 2>&1; then
    echo "error: python3 not found: install Python 3.10 or newer" >&2
    exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found: glm2rs builds from source here; install Rust 1.89 or newer from" \
         "https://rustup.rs (the first build takes about 12 minutes on 2 cores)" >&2
    exit 1
fi
if python3 -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)'; then
    : # already in a virtual environment
elif python3 -c 'import os, sys, sysconfig; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
    if [ ! -x .venv/bin/python ]; then
        echo "this system's Python refuses pip installs (PEP 668): making a virtual environment in .venv" >&2
        python3 -m venv .venv || { echo "error: python3 -m venv failed (Debian: apt install python3-venv)" >&2; exit 1; }
    fi
    PY="$PWD/.venv/bin/python"
    export PATH="$PWD/.venv/bin:$PATH"
fi
