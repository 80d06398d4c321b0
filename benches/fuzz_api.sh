#!/usr/bin/env bash
# Fuzz `glm2rs serve` from its OpenAPI description (benches/openapi.yaml) with schemathesis:
# generated valid and invalid requests for every operation; the check is that no answer is a
# 5xx, then that the server still answers. Issue #17. A request without max_tokens generates up to
# the context (the official chat default), which can take a while on a CPU: hence the long timeout.
#   bash benches/fuzz_api.sh MODEL_DIR [MAX_EXAMPLES]      (schemathesis in a venv of its own)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:?model directory}"; N="${2:-100}"
VENV="${FUZZ_VENV:-/tmp/glm2rs-fuzz-venv}"
[ -x "$VENV/bin/schemathesis" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q schemathesis; }
PORT=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
python3 -m glm2rs.cli serve --model "$MODEL" --port "$PORT" --max-queue 64 2> /tmp/glm2rs-fuzz-server.log &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
"$VENV/bin/schemathesis" run benches/openapi.yaml --url "http://127.0.0.1:$PORT" \
    --checks not_a_server_error --max-examples "$N" --workers 2 --suppress-health-check all \
    --request-timeout 300 ${FUZZ_ARGS:-}
curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && echo "server still answering after the fuzz"
kill -0 $SERVER && echo "server process alive"
