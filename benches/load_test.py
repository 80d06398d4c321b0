"""Load test of `glm2rs serve` on loopback: N concurrent streaming clients (OpenAI chat API), then
the same requests one at a time. Prints throughput and p50/p99 latency of both, as a markdown table.

    python benches/load_test.py --model ../shared/fixtures/tiny-glm2/model --clients 32 --max-tokens 64

Every request must complete with its full token count (none lost); the script exits 1 otherwise.
Greedy decoding (temperature 0) with distinct prompts, so the work is the same in both modes.

    python benches/load_test.py --model DIR --clients 32 --max-tokens 32 --turns 10

`--turns N`: multi-turn chat instead: each client holds a conversation of N turns (the history
grows with every question and answer), all clients at once; run against a server with the prefix
cache and one without (`prefix_cache=False`). Prints time to first token per turn (p50 over the
conversations) of both, the prompt tokens and the cached ones (`usage.prompt_tokens_details`),
and checks that both servers gave the same answers (greedy). `--history-tokens N`: each
conversation opens with a document of about N tokens (long conversations); `--kv-cache-memory`
below what they need: requests wait or are preempted, none may be lost.
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


def stream_chat(host, port, messages, max_tokens):
    """One streaming chat request: (latency s, time to first token s, text, usage); raises when
    the stream does not end with its usage and `[DONE]`."""
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(host, port, timeout=600)
    c.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"}, body=json.dumps({
        "messages": messages, "stream": True, "temperature": 0, "max_tokens": max_tokens,
        "stream_options": {"include_usage": True}}))
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    first, text, usage, done = None, [], None, False
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
            usage = j["usage"]
        if j.get("choices") and j["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter() - t0
            text.append(j["choices"][0]["delta"]["content"])
    c.close()
    if not done or usage is None:
        raise RuntimeError("stream ended early")
    return time.perf_counter() - t0, first or 0.0, "".join(text), usage


def stream_one(host, port, prompt, max_tokens):
    """One streaming chat request; returns (latency s, time to first token s, completion tokens)."""
    latency, first, _, usage = stream_chat(host, port, [{"role": "user", "content": prompt}], max_tokens)
    return latency, first, usage["completion_tokens"]


def chat_turn(host, port, messages, max_tokens):
    """One streaming chat turn: (time to first token s, text, prompt tokens, cached tokens)."""
    latency, first, text, usage = stream_chat(host, port, messages, max_tokens)
    return first or latency, text, usage["prompt_tokens"], \
        usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)


def history_text(model, i, tokens):
    """A first message of about `tokens` tokens (distinct per conversation `i`): a long document
    the conversation is about, as in chats over a pasted file."""
    if tokens <= 0:
        return ""
    unit = f"第{i}份文件的第{{}}段：数字 {i} 在这里出现，记录了一段很长的历史，用来测试长上下文的对话。"
    parts, n, k = [], 0, 0
    tok = model.tokenizer
    while n < tokens:
        piece = unit.format(k)
        parts.append(piece)
        n += len(tok.encode(piece, add_special_tokens=False))
        k += 1
    return "".join(parts) + "\n"


def conversations(model, clients, turns, max_tokens, history_tokens=0):
    """`clients` conversations of `turns` turns at once against a server of `model`: per turn the
    list of (ttft, text, prompt tokens, cached tokens) over the conversations, the errors, and the
    server's metrics at the end. `history_tokens`: each conversation opens with a document of about
    that many tokens."""
    per_turn = [[None] * clients for _ in range(turns)]
    errors = []
    with glm2rs.Server(model, port=0, max_batch=max(clients, 1)) as s:
        chat_turn(s.host, s.port, [{"role": "user", "content": "warm up"}], 4)

        def talk(i):
            msgs = []
            try:
                for t in range(turns):
                    doc = history_text(model, i, history_tokens) if t == 0 else ""
                    msgs.append({"role": "user", "content": f"{doc}第{i}位用户的第{t + 1}个问题：请继续讲关于数字 {i} 的故事"})
                    r = chat_turn(s.host, s.port, msgs, max_tokens)
                    per_turn[t][i] = r
                    msgs.append({"role": "assistant", "content": r[1]})
            except Exception as e:  # noqa: BLE001 - reported
                errors.append(f"{i}: {e}")

        ts = [threading.Thread(target=talk, args=(i,)) for i in range(clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return per_turn, errors, scrape(s.host, s.port)


def multi_turn(args, model) -> int:
    off = glm2rs.Model.from_pretrained(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                                       progress=False, prefix_cache=False, kv_block_size=args.block_size,
                                       kv_cache_memory=args.kv_cache_memory)
    out = {"model": args.model, "clients": args.clients, "turns": args.turns, "max_tokens": args.max_tokens,
           "history_tokens": args.history_tokens, "kv_cache_memory": args.kv_cache_memory}
    res = {}
    for label, m in (("cache", model), ("no_cache", off)):
        print(f"{args.clients} conversations of {args.turns} turns, prefix cache {label} ...", file=sys.stderr)
        t0 = time.perf_counter()
        per_turn, errors, mets = conversations(m, args.clients, args.turns, args.max_tokens, args.history_tokens)
        res[label] = (per_turn, errors, time.perf_counter() - t0, mets)
    print("| turn | prompt tokens p50 | cached tokens p50 | first token p50, with the prefix cache | without | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    lost = 0
    same = True
    first_diff = [None] * args.clients  # the first turn where a conversation's two answers differ
    rows = []
    for t in range(args.turns):
        a = [r for r in res["cache"][0][t] if r]
        b = [r for r in res["no_cache"][0][t] if r]
        lost += 2 * args.clients - len(a) - len(b)
        same &= [r[1] for r in res["cache"][0][t]] == [r[1] for r in res["no_cache"][0][t]]
        for i in range(args.clients):
            ra, rb = res["cache"][0][t][i], res["no_cache"][0][t][i]
            if first_diff[i] is None and (ra is None or rb is None or ra[1] != rb[1]):
                first_diff[i] = t + 1
        ta, tb = statistics.median(r[0] for r in a), statistics.median(r[0] for r in b)
        row = {"turn": t + 1, "prompt_tokens_p50": statistics.median(r[2] for r in a),
               "cached_tokens_p50": statistics.median(r[3] for r in a), "ttft_cache_p50_s": ta, "ttft_no_cache_p50_s": tb}
        rows.append(row)
        print(f"| {t + 1} | {row['prompt_tokens_p50']:.0f} | {row['cached_tokens_p50']:.0f} | {ta * 1000:.1f} ms | "
              f"{tb * 1000:.1f} ms | {tb / ta:.2f}x |")
    first, last = rows[0], rows[-1]
    print(f"turn {args.turns} / turn 1 first token: {last['ttft_cache_p50_s'] / first['ttft_cache_p50_s']:.2f}x with the "
          f"prefix cache, {last['ttft_no_cache_p50_s'] / first['ttft_no_cache_p50_s']:.2f}x without; "
          f"wall {res['cache'][2]:.1f} s / {res['no_cache'][2]:.1f} s; same answers: {same}; lost: {lost}")
    diverged = sorted(t for t in first_diff if t is not None)
    print(f"conversations with the same answers in every turn: {args.clients - len(diverged)} of {args.clients}"
          + (f" (the others first differ at turns {diverged})" if diverged else ""))
    for label in ("cache", "no_cache"):
        print(f"{label}: preemptions {res[label][3].get('glm2rs_num_preemptions_total', 'n/a')}, "
              f"KV cache blocks {res[label][3].get('glm2rs_kv_cache_blocks_total', 'n/a')}")
    out["metrics"] = {label: res[label][3] for label in ("cache", "no_cache")}
    out.update({"turns_table": rows, "same_answers": same, "first_different_turn": first_diff, "lost": lost,
                "wall_s": {"cache": res["cache"][2], "no_cache": res["no_cache"][2]}})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if lost or not same:
        print(f"errors: {res['cache'][1][:3]} {res['no_cache'][1][:3]}", file=sys.stderr)
        return 1
    return 0


def scrape(host, port):
    """`GET /metrics` as {name: value} (label-free samples only)."""
    c = http.client.HTTPConnection(host, port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    out = {}
    for ln in text.splitlines():
        if ln and not ln.startswith("#") and "{" not in ln:
            name, _, value = ln.rpartition(" ")
            out[name] = float(value)
    return out


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
    ap.add_argument("--turns", type=int, default=0, help="multi-turn conversations of this many turns")
    ap.add_argument("--history-tokens", type=int, default=0,
                    help="with --turns: each conversation opens with a document of about this many tokens")
    ap.add_argument("--block-size", type=int, default=16, help="KV cache block size")
    ap.add_argument("--kv-cache-memory", default=None,
                    help="KV cache limit (0.9, 8GiB, bytes): below what the clients need, requests wait or are preempted")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    model = glm2rs.Model.from_pretrained(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                                         progress=True, kv_block_size=args.block_size,
                                         kv_cache_memory=args.kv_cache_memory)
    if args.turns:
        return multi_turn(args, model)
    prompts = [f"第{i}个问题：请讲一个关于数字 {i} 的故事" for i in range(args.clients)]
    out = {"model": args.model, "clients": args.clients, "max_tokens": args.max_tokens}
    with glm2rs.Server(model, port=0, max_batch=max(args.clients, 1)) as s:
        stream_one(s.host, s.port, "warm up", 4)
        print(f"{args.clients} concurrent clients ...", file=sys.stderr)
        out["concurrent"] = run(s.host, s.port, prompts, args.max_tokens, True)
        m = scrape(s.host, s.port)
        out["preemptions"] = m.get("glm2rs_num_preemptions_total", float("nan"))
        out["kv_blocks_total"] = m.get("glm2rs_kv_cache_blocks_total", float("nan"))
        print(f"KV cache blocks {out['kv_blocks_total']:.0f}, preemptions {out['preemptions']:.0f}", file=sys.stderr)
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
