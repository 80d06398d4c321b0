"""Load test of `glm2rs serve` on loopback: N concurrent streaming clients (OpenAI chat API), then
the same requests one at a time. Prints throughput and p50/p99 latency of both, as a markdown table.

    python benches/load_test.py --model ../shared/fixtures/tiny-glm2/model --clients 32 --max-tokens 64

Every request must complete with its full token count (none lost); the script exits 1 otherwise.
Greedy decoding (temperature 0) with distinct prompts, so the work is the same in both modes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time

import glm2rs


def stream_one(host, port, prompt, max_tokens):
    """One streaming chat request; returns (latency s, time to first token s, completion tokens)."""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(host, port, timeout=600)
    c.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"}, body=json.dumps({
        "messages": [{"role": "user", "content": prompt}], "stream": True, "temperature": 0,
        "max_tokens": max_tokens, "stream_options": {"include_usage": True}}))
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first = None
    tokens = None
    done = False
    for line in r:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        j = json.loads(data)
        if j.get("usage"):
            tokens = j["usage"]["completion_tokens"]
        if first is None and j.get("choices") and j["choices"][0]["delta"].get("content"):
            first = time.perf_counter() - t0
    c.close()
    if not done or tokens is None:
        raise RuntimeError("stream ended early")
    return time.perf_counter() - t0, first or 0.0, tokens


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def run(host, port, prompts, max_tokens, concurrent):
    results = [None] * len(prompts)
    errors = []

    def work(i):
        try:
            results[i] = stream_one(host, port, prompts[i], max_tokens)
        except Exception as e:  # noqa: BLE001 - counted as lost
            errors.append(f"{i}: {e}")

    t0 = time.perf_counter()
    if concurrent:
        ts = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    else:
        for i in range(len(prompts)):
            work(i)
            print(f"\r  sequential {i + 1}/{len(prompts)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    wall = time.perf_counter() - t0
    ok = [r for r in results if r is not None]
    tokens = sum(r[2] for r in ok)
    lat = [r[0] for r in ok]
    ttft = [r[1] for r in ok]
    return {
        "requests": len(prompts), "completed": len(ok), "lost": len(prompts) - len(ok), "errors": errors[:5],
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "latency_p50_s": statistics.median(lat) if lat else None, "latency_p99_s": pct(lat, 99) if lat else None,
        "ttft_p50_s": statistics.median(ttft) if ttft else None, "ttft_p99_s": pct(ttft, 99) if ttft else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quantize")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip-sequential", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    model = glm2rs.Model.from_pretrained(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                                         progress=True)
    prompts = [f"第{i}个问题：请讲一个关于数字 {i} 的故事" for i in range(args.clients)]
    out = {"model": args.model, "clients": args.clients, "max_tokens": args.max_tokens}
    with glm2rs.Server(model, port=0, max_batch=max(args.clients, 1)) as s:
        stream_one(s.host, s.port, "warm up", 4)
        print(f"{args.clients} concurrent clients ...", file=sys.stderr)
        out["concurrent"] = run(s.host, s.port, prompts, args.max_tokens, True)
        if not args.skip_sequential:
            print("the same requests one at a time ...", file=sys.stderr)
            out["sequential"] = run(s.host, s.port, prompts, args.max_tokens, False)
    print("| mode | requests | lost | tokens | wall s | tokens/s | latency p50 / p99 s | first token p50 / p99 s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode in ("concurrent", "sequential"):
        r = out.get(mode)
        if r:
            print(f"| {mode} | {r['requests']} | {r['lost']} | {r['tokens']} | {r['wall_s']:.2f} | "
                  f"{r['tokens_per_s']:.1f} | {r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} | "
                  f"{r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} |")
    if "sequential" in out:
        print(f"speed-up of concurrent serving: {out['concurrent']['tokens_per_s'] / out['sequential']['tokens_per_s']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    lost = sum(out[m]["lost"] for m in ("concurrent", "sequential") if m in out)
    if lost:
        print(f"LOST {lost} requests: {out['concurrent']['errors']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
