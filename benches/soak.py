"""Soak test of `glm2rs serve` (issue #17): mixed load for a while, the server's RSS and open file
descriptors recorded every minute (they must stay flat after warm-up), no 5xx, the server still
answering at the end.

    python benches/soak.py --model FIXTURES/model --minutes 30 [--workers 6]

Load, spread over the workers: streamed chat answers read to the end, streams dropped after the
first chunk, non-streamed completions, malformed requests (bad JSON, wrong types, unknown
routes, over-long stop lists), and slow clients that send half a header and wait.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import http.client


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--workers", type=int, default=6)
    a = ap.parse_args()
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "glm2rs.cli", "serve", "--model", a.model, "--port", str(port),
                               "--header-timeout", "5"], stderr=subprocess.PIPE, text=True)
    line = server.stderr.readline()
    while "serving" not in line:
        if server.poll() is not None:
            print("server exited:", server.stderr.read())
            return 1
        line = server.stderr.readline()
    threading.Thread(target=lambda: server.stderr.read(), daemon=True).start()
    counts = {"ok": 0, "4xx": 0, "5xx": 0, "dropped": 0, "slow": 0, "client_errors": 0}
    lock = threading.Lock()
    end = time.time() + a.minutes * 60

    def bump(k):
        with lock:
            counts[k] += 1

    def post(path, body, raw=False, stream=False, drop=False):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        c.request("POST", path, body=body if raw else json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if drop:
            r.readline()
            c.close()  # the client goes away mid-answer
            bump("dropped")
            return
        r.read()
        c.close()
        bump("5xx" if r.status >= 500 else "4xx" if r.status >= 400 else "ok")

    def slow():
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        s.settimeout(20)
        try:
            while s.recv(1024):
                pass
        except OSError:
            pass
        s.close()
        bump("slow")

    chat = {"model": "m", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 48}
    actions = [
        lambda: post("/v1/chat/completions", dict(chat, stream=True)),
        lambda: post("/v1/chat/completions", dict(chat, stream=True, max_tokens=400), drop=True),
        lambda: post("/v1/completions", {"prompt": "hello " * random.randint(1, 200), "max_tokens": 16}),
        lambda: post("/v1/chat/completions", b'{"messages": [', raw=True),
        lambda: post("/v1/chat/completions", {"messages": "nope", "max_tokens": -3}),
        lambda: post("/v1/chat/completions", dict(chat, stop=["x"] * 100)),
        lambda: post("/nowhere", {}),
        slow,
    ]

    def worker(seed):
        rng = random.Random(seed)
        while time.time() < end:
            try:
                rng.choice(actions)()
            except Exception:  # noqa: BLE001 - a client-side timeout or reset is counted, not fatal
                bump("client_errors")

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(a.workers)]
    for t in threads:
        t.start()
    print("| minute | server RSS MiB | open fds | ok | 4xx | 5xx | dropped streams | slow clients | client errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    minute = 0
    while time.time() < end:
        time.sleep(min(60, max(0, end - time.time())))
        minute += 1
        with lock:
            c = dict(counts)
        print(f"| {minute} | {rss_mib(server.pid):.1f} | {fds(server.pid)} | {c['ok']} | {c['4xx']} | {c['5xx']} | "
              f"{c['dropped']} | {c['slow']} | {c['client_errors']} |", flush=True)
    for t in threads:
        t.join(timeout=60)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/health")
    alive = c.getresponse().status == 200
    server.terminate()
    rc = server.wait(timeout=30)
    print(f"still answering at the end: {alive}; exit status after SIGTERM: {rc}; 5xx: {counts['5xx']}")
    return 0 if alive and rc == 0 and counts["5xx"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
