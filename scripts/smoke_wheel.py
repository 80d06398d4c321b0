"""The smoke test of an installed glm2rs wheel (scripts/check_wheel.sh runs it in a fresh virtual
environment): the tiny fixture streamed, chatted with, and served over HTTP (the official
contract and the OpenAI chat API, streamed), each answer checked; exit status 1 on any failure."""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.request

import glm2rs


def main() -> int:
    for tool in ("cargo", "rustc"):
        if shutil.which(tool):
            print(f"error: {tool} is reachable ({shutil.which(tool)}): the check must run without Rust")
            return 1
    model_dir = os.path.join(os.environ["GLM2RS_FIXTURES"], "model")
    print(f"glm2rs {glm2rs.__version__} from {os.path.dirname(glm2rs.__file__)}")
    info = glm2rs.build_info()
    print(f"features {info['features']}, CPU {info['cpu']}")
    assert "server" in info["features"], info
    m = glm2rs.Model.from_pretrained(model_dir, progress=False)
    # stream: pieces join to the text of the same greedy request
    s = m.stream("你好", max_new_tokens=12, do_sample=False)
    pieces = list(s)
    whole = m.generate("你好", max_new_tokens=12, do_sample=False)
    assert len(s.token_ids) > 0 and "".join(pieces) == whole, (pieces, whole)
    # chat: the answer and the history
    answer, history = m.chat("你好", history=[], max_new_tokens=8, do_sample=False)
    assert history and history[-1][0] == "你好" and history[-1][1] == answer, history
    # serve: the official POST / and a streamed OpenAI chat completion
    with glm2rs.Server(m, port=0) as srv:
        base = f"http://{srv.host}:{srv.port}"
        req = urllib.request.Request(base + "/", data=json.dumps({"prompt": "你好", "history": [], "max_length": 64}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read())
        assert r.status == 200 and isinstance(body.get("response"), str), body
        req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps({
            "messages": [{"role": "user", "content": "你好"}], "stream": True, "max_tokens": 8,
            "temperature": 0}).encode(), headers={"Content-Type": "application/json"})
        text, done = [], False
        with urllib.request.urlopen(req, timeout=60) as r:
            for line in r:
                line = line.strip()
                if line == b"data: [DONE]":
                    done = True
                elif line.startswith(b"data:"):
                    delta = json.loads(line[5:])["choices"][0]["delta"]
                    text.append(delta.get("content") or "")
        assert done, "the stream did not end with [DONE]"
    print(f"stream ok ({len(s.token_ids)} tokens), chat ok, server ok (POST / and a streamed chat of {len(''.join(text))} chars)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
