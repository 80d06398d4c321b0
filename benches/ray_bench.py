"""glm2rs on Ray Serve against one `glm2rs serve` process (issue #20's figures).

    python benches/ray_bench.py --model ../shared/fixtures/tiny-glm2/model [--requests 64 --concurrency 16]

1. Throughput: `--requests` streamed greedy chat requests (`--max-tokens` each), `--concurrency` at
   a time, against one `glm2rs.Server`, then Ray Serve with 1 and with 2 replicas (a local Ray
   instance with this machine's CPUs, 1 CPU reserved per replica), with the ingress and its
   prefix-affinity router (the default) and without (`prefix_routing=False`): requests/s, tokens/s.
2. Latency of one stream: time to first token and to the last, one request at a time (`--single`
   runs, medians), direct against through Ray (1 replica).
Prints a Markdown table; `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time

import glm2rs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream(port: int, i: int, max_tokens: int):
    """One streamed chat request: (seconds to the first content, seconds in all, tokens)."""
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"第{i}个问题：讲一个故事"}],
                       "temperature": 0, "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    c.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first, tokens = None, 0
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if "error" in ev:
            raise RuntimeError(ev["error"]["message"])
        if ev.get("choices") and ev["choices"][0]["delta"].get("content") and first is None:
            first = time.perf_counter() - t0
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
    return first or 0.0, time.perf_counter() - t0, tokens


def load(port: int, requests: int, concurrency: int, max_tokens: int):
    results, lock, nxt = [], threading.Lock(), [0]

    def worker():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= requests:
                return
            r = stream(port, i, max_tokens)
            with lock:
                results.append(r)

    stream(port, -1, 4)  # warm up
    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests_per_s": requests / wall, "tokens_per_s": sum(r[2] for r in results) / wall, "wall_s": wall,
            "first_token_p50_s": statistics.median(r[0] for r in results)}


def single(port: int, runs: int, max_tokens: int):
    stream(port, -1, 4)
    rs = [stream(port, i, max_tokens) for i in range(runs)]
    return {"first_token_p50_s": statistics.median(r[0] for r in rs), "total_p50_s": statistics.median(r[1] for r in rs)}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - informational
        return platform.processor()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--single", type=int, default=10, help="one-at-a-time runs for the latency figure")
    ap.add_argument("--json")
    args = ap.parse_args()
    import ray
    from ray import serve

    import glm2rs.ray as gray

    out = {"cpu": cpu_name(), "cpus": os.cpu_count(), "ray": ray.__version__, "args": vars(args)}
    model = glm2rs.Model.from_pretrained(args.model, dtype=args.dtype, progress=False)
    with glm2rs.Server(model, port=0, model_name="m") as s:
        out["server"] = load(s.port, args.requests, args.concurrency, args.max_tokens)
        out["server_single"] = single(s.port, args.single, args.max_tokens)
    del model
    ray.init(include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for routing in ("prefix", "load"):
            for n in (1, 2):
                app = gray.build_app(args.model, replicas=n, dtype=args.dtype, model_name="m",
                                     prefix_routing=routing == "prefix")
                serve.run(app, name="glm2rs", route_prefix="/")
                out[f"ray_{routing}_{n}"] = load(port, args.requests, args.concurrency, args.max_tokens)
                if n == 1:
                    out[f"ray_{routing}_single"] = single(port, args.single, args.max_tokens)
                serve.delete("glm2rs")
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"{out['cpu']}, {out['cpus']} CPUs, Ray {out['ray']}; {args.requests} streamed requests of "
          f"{args.max_tokens} tokens, {args.concurrency} at a time")
    print("| server | requests/s | tokens/s | first token p50 | one stream alone: first token / whole answer (p50) |")
    print("| --- | --- | --- | --- | --- |")
    rows = [("server", "server_single", "glm2rs serve (one process)")]
    for routing, what in (("prefix", "ingress + prefix-affinity router (default)"),
                          ("load", "replicas as ingress, routed by load (`prefix_routing=False`)")):
        rows += [(f"ray_{routing}_1", f"ray_{routing}_single", f"Ray Serve, 1 replica, {what}"),
                 (f"ray_{routing}_2", None, f"Ray Serve, 2 replicas, {what}")]
    for k, ks, label in rows:
        r = out[k]
        alone = (f"{out[ks]['first_token_p50_s'] * 1000:.1f} / {out[ks]['total_p50_s'] * 1000:.1f} ms" if ks else "")
        print(f"| {label} | {r['requests_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['first_token_p50_s'] * 1000:.1f} ms | {alone} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
