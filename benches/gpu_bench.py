"""GPU checks and figures, run on the device machine (no download: random weights of the real
chatglm2-6b shapes are written there first).

    python benches/gpu_bench.py --fixtures DIR [--parity] [--graph] [--flash] [--long] [--big] [--quant 4,8] [--batches 16,64]
                                [--num-gpus 2] [--out results.json]

- parity: tiny-glm2 on CUDA in float32 (logits against the official golden, greedy chats, int8/int4
  official checkpoints, batched generation equal to one at a time), then the official int8/int4
  checkpoints in bfloat16/float16 against float32 for each GEMV path (one row, batches, prefill);
- big: chatglm2-6b bf16: load time, prefill of 2048 tokens, decode tokens/s at batch 1 (and the
  given batches, aggregate), peak GPU memory of the process (nvidia-smi, polled) and of the allocator
  (glm2rs.cuda_memory: live allocations, as torch.cuda.max_memory_allocated);
- quant: the same for block-quantized weights (quantize= on load);
- long: bfloat16 prefill of 8192 and 32768 tokens (time, allocated peak);
- flash: the flash-attention prompt kernel against the blocked path, both against float32 (6B);
- graph: decoding with CUDA graphs against the same steps launched one by one (ids equal on the
  tiny models in four dtypes; the 6B batch-1 decode timed both ways, ids compared);
- num-gpus: the layers split over N GPUs (parity on the fixture, then 6B decode).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

import glm2rs

RESULTS: dict = {}


def log(msg: str) -> None:
    print(msg, flush=True)


class PeakMemory:
    """Highest GPU memory of this process (all GPUs summed), polled with nvidia-smi."""

    def __init__(self, period: float = 0.05):
        self.period, self.peak, self.stop_flag = period, 0, False
        self.t = threading.Thread(target=self.run, daemon=True)

    def now(self) -> int:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        mine = [int(l.split(",")[1]) for l in out.strip().splitlines() if l and int(l.split(",")[0]) == os.getpid()]
        return sum(mine)

    def run(self):
        while not self.stop_flag:
            try:
                self.peak = max(self.peak, self.now())
            except Exception:  # noqa: BLE001
                pass
            time.sleep(self.period)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *a):
        self.stop_flag = True
        self.t.join()
        self.peak = max(self.peak, self.now())


def parity(fx: Path, num_gpus: int = 1) -> None:
    fw = dict(np.load(fx / "golden" / "forward.npz"))
    chats = json.loads((fx / "golden" / "generate.json").read_text())["chat"]
    quantized = json.loads((fx / "golden" / "quantized.json").read_text())
    for sub in ("model-safetensors", "model", "model-int8", "model-int4"):
        if not any((fx / sub).glob("*.safetensors")) and not any((fx / sub).glob("*.bin")):
            continue  # not carried to this machine
        m = glm2rs.Model.from_pretrained(str(fx / sub), device="cuda", dtype="float32", num_gpus=num_gpus)
        tok = m.tokenizer
        worst, same, total = 0.0, 0, 0
        if "int" in sub:
            bits = sub.split("-")[1]
            g = quantized[bits]
            want = np.load(fx / "golden" / f"{bits}_last_logits.npy").reshape(-1)
            worst = float(np.abs(m.logits(g["prompt_ids"])[-1] - want).max())
            ids = tok.encode(tok.build_prompt(g["greedy_query"]))
            same = int(m.generate_ids(ids, max_new_tokens=len(g["greedy_output_ids"])) == g["greedy_output_ids"])
            total = 1
        else:
            for i in range(3):
                ids = [int(x) for x in fw[f"ids_{i}"].reshape(-1)]
                got = m.logits(ids)
                want = fw[f"logits_{i}"]
                got = got[-1:] if want.shape[0] == 1 else got
                worst = max(worst, float(np.abs(got - want).max()))
            for t in chats:
                prompt = tok.build_prompt(t["query"], [tuple(h) for h in t["history"]])
                same += m.generate_ids(tok.encode(prompt), max_new_tokens=t["max_new_tokens"]) == t["output_ids"]
            total = len(chats)
        prompts = [tok.encode(p) for p in ("你好", "a longer prompt with more tokens in it", "x")]
        single = [m.generate_ids(p, max_new_tokens=16) for p in prompts]
        runs = 5 if num_gpus > 1 else 1
        equal = sum(m.generate_batch_ids(prompts, max_new_tokens=16) == single for _ in range(runs))
        batch_ok = equal == runs
        RESULTS.setdefault("parity", {})[f"{sub}/gpus{num_gpus}"] = {
            "max_logit_err": worst, "greedy_equal": f"{same}/{total}", "batch_equal": f"{equal}/{runs}"}
        log(f"parity {sub} cuda f32 x{num_gpus}: max logit err {worst:.2e}, greedy equal {same}/{total}, "
            f"batched == one at a time: {batch_ok} ({equal}/{runs})")


def parity16(fx: Path) -> None:
    """Official int8/int4 in 16-bit models against the exact float32 model on the same tokens
    (causal: the first rows see the same inputs): one row (the float GEMV in float16, the integer
    one in bfloat16), 6 rows (the integer
    GEMV, x rounded to int8 per 8 columns), 20 rows (the integer GEMV in chunks of 8) and 40 rows
    (dequantize + matmul). Errors are max |logit difference|, and relative to max |logit|."""
    ids = [64790, 64792] + list(range(1000, 1038))  # 40 tokens
    for sub in ("model-int8", "model-int4"):
        if not any((fx / sub).glob("*.safetensors")) and not any((fx / sub).glob("*.bin")):
            continue
        ref = glm2rs.Model.from_pretrained(str(fx / sub), device="cuda", dtype="float32").logits(ids)
        scale = float(np.abs(ref).max())
        for dtype in ("bfloat16", "float16"):
            m = glm2rs.Model.from_pretrained(str(fx / sub), device="cuda", dtype=dtype)
            err = {n: float(np.abs(m.logits(ids[:n]) - ref[:n]).max()) for n in (1, 6, 20, 40)}
            ok = err[1] <= max(2 * err[40], 1e-2) and max(err[6], err[20]) <= 0.02 * scale
            RESULTS.setdefault("parity16", {})[f"{sub}/{dtype}"] = {"max_abs_logit": scale, "err": err, "ok": ok}
            log(f"parity {sub} {dtype} (max |logit| {scale:.1f}): max err 1 row ({'float' if dtype == 'float16' else 'integer'} GEMV) {err[1]:.2e}, "
                f"6 rows (integer GEMV) {err[6]:.2e}, 20 rows (chunks) {err[20]:.2e}, "
                f"40 rows (dequantize+matmul) {err[40]:.2e} -> {'ok' if ok else 'WORSE'}")


def graph_check(fx: Path) -> None:
    """Decoding with CUDA graphs (the default) against the same steps launched one by one
    (`Model.with_tuning(cuda_graph=False)`, the same weights): greedy ids over 300 steps (the cache grows past 256 entries, so the
    step is captured again), float32, bfloat16 and official int4/int8, and the time per step."""
    tok = None
    for sub, dtype in (("model-safetensors", "float32"), ("model-safetensors", "bfloat16"),
                       ("model-int4", "bfloat16"), ("model-int8", "float16")):
        if not any((fx / sub).glob("*.safetensors")) and not any((fx / sub).glob("*.bin")):
            continue
        m = glm2rs.Model.from_pretrained(str(fx / sub), device="cuda", dtype=dtype)
        tok = m.tokenizer
        prompts = [tok.encode(tok.build_prompt(q)) for q in ("你好", "Tell me a story about a cat.", "x")]
        m.generate_ids(prompts[0], max_new_tokens=8)  # kernels loaded before either is timed
        out, speed = {}, {}
        for mode, mm in (("1", m), ("0", m.with_tuning(cuda_graph=False))):
            t = time.perf_counter()
            out[mode] = [mm.generate_ids(p, max_new_tokens=300) for p in prompts]
            n = sum(len(o) for o in out[mode])
            speed[mode] = n / (time.perf_counter() - t)
        same = out["1"] == out["0"]
        RESULTS.setdefault("graph_check", {})[f"{sub}/{dtype}"] = {
            "equal": same, "tokens": [len(o) for o in out["1"]], "tok_s_graph": speed["1"], "tok_s_eager": speed["0"]}
        log(f"graph check {sub} {dtype}: graph ids == eager ids: {same} (lengths {[len(o) for o in out['1']]}), "
            f"tiny-model tok/s graph {speed['1']:.0f} vs eager {speed['0']:.0f}")


def flash_check(d: Path) -> None:
    """Prompt attention of the flash kernel against the blocked path (`with_tuning(flash=False)`) on the 6B
    checkpoint in bfloat16 and float16, both against the same weights in float32 (logits of 300- and
    37-token prompts), and the 2048-token prefill time of each."""
    rng = np.random.default_rng(0)
    long_ids = [64790, 64792] + [int(x) for x in rng.integers(100, 60000, 2046)]
    prompts = {"300": long_ids[:300], "37": long_ids[:37]}

    def flash_and_blocked(m, f):
        return f(m.with_tuning(flash=True)), f(m.with_tuning(flash=False))

    got = {}
    for dtype in ("bfloat16", "float16"):
        m = glm2rs.Model.from_pretrained(str(d), device="cuda", dtype=dtype, prefix_cache=False)
        got[dtype] = {n: flash_and_blocked(m, lambda mm: mm.logits(ids)) for n, ids in prompts.items()}
        if dtype == "bfloat16":
            m.last_logits([long_ids[:64]])

            def prefill(mm):
                ts = []
                for _ in range(3):
                    t = time.perf_counter()
                    mm.last_logits([long_ids])
                    ts.append(time.perf_counter() - t)
                return min(ts)

            fl, bl = flash_and_blocked(m, prefill)
            RESULTS.setdefault("flash", {})["prefill_2048_s"] = {"flash": fl, "blocked": bl}
            log(f"prefill 2048 bf16: flash {fl:.4f} s, blocked {bl:.4f} s")
        del m
    m = glm2rs.Model.from_pretrained(str(d), device="cuda", dtype="float32")
    ref = {n: m.logits(ids) for n, ids in prompts.items()}
    del m
    for dtype, per in got.items():
        for n, (fl, bl) in per.items():
            e = {"flash": float(np.abs(fl - ref[n]).max()), "blocked": float(np.abs(bl - ref[n]).max()),
                 "flash_vs_blocked": float(np.abs(fl - bl).max()), "max_abs_logit": float(np.abs(ref[n]).max()),
                 "nan": bool(np.isnan(fl).any())}
            RESULTS.setdefault("flash", {})[f"{dtype}/{n}"] = e
            log(f"flash {dtype} prompt {n}: max |logit - float32| flash {e['flash']:.4f}, blocked {e['blocked']:.4f}, "
                f"flash vs blocked {e['flash_vs_blocked']:.4f} (max |logit| {e['max_abs_logit']:.2f}), NaN {e['nan']}")


def long_prefill(d: Path, lengths: tuple[int, ...] = (8192, 32768)) -> None:
    """Prefill of long prompts in bfloat16 (the official figures: 0.89 s / 14.9 GiB at 8192 tokens,
    1.24 s / 24.6 GiB at 32768 on an H200): best of 2, and the allocator's peak."""
    m = glm2rs.Model.from_pretrained(str(d), device="cuda", dtype="bfloat16", prefix_cache=False)
    rng = np.random.default_rng(0)
    m.last_logits([[64790, 64792] + [int(x) for x in rng.integers(100, 60000, 62)]])
    for n in lengths:
        ids = [64790, 64792] + [int(x) for x in rng.integers(100, 60000, n - 2)]
        glm2rs.cuda_memory("cuda", reset_peak=True)
        ts = []
        for _ in range(2):
            t = time.perf_counter()
            m.last_logits([ids])
            ts.append(time.perf_counter() - t)
        peak = glm2rs.cuda_memory("cuda")["used_peak"] / 2**30
        RESULTS.setdefault("long_prefill", {})[str(n)] = {"s": min(ts), "allocated_peak_gib": peak}
        log(f"prefill {n} bf16: {min(ts):.3f} s, allocated peak {peak:.2f} GiB")
    del m


def make_big(fx: Path, d: Path, layers: int = 28) -> Path:
    """A random-weight bfloat16 checkpoint of chatglm2-6b's shapes (`layers` of them) in `d`,
    written once (benches/make_random_checkpoint.py); later calls reuse it."""
    if not (d / "config.json").exists():
        t0 = time.time()
        subprocess.run([sys.executable, "benches/make_random_checkpoint.py", str(d), "--dtype", "bfloat16",
                        "--layers", str(layers), "--fixtures", str(fx)], check=True, stdout=subprocess.DEVNULL)
        log(f"random chatglm2-6b bf16 ({layers} layers) written in {time.time() - t0:.0f} s")
    return d


def figures(label: str, d: Path, batches: list[int], quantize: str | None = None, num_gpus: int = 1,
            decode_tokens: int = 128, compare_graph: bool = False) -> None:
    # (models without the prefix cache: the same prompt timed again is computed again)
    r: dict = {}
    with PeakMemory() as pm:
        t0 = time.perf_counter()
        # a quantized model is written once as GGUF (quantizing on load takes a minute) and read
        # back by later runs: the same official bytes
        gguf = d.parent / f"{d.name}-{quantize}.gguf"
        if quantize and gguf.exists():
            m = glm2rs.Model.from_pretrained(str(gguf), device="cuda", dtype="bfloat16", num_gpus=num_gpus,
                                             prefix_cache=False)
        else:
            m = glm2rs.Model.from_pretrained(str(d), device="cuda", dtype="bfloat16", quantize=quantize,
                                             num_gpus=num_gpus, prefix_cache=False)
        r["load_s"] = time.perf_counter() - t0
        if quantize and not gguf.exists():
            m.save_quantized(str(gguf))
        r["weight_gib"] = m.weight_bytes / 2**30
        rng = np.random.default_rng(0)
        ids = [64790, 64792] + [int(x) for x in rng.integers(100, 60000, 2046)]
        m.last_logits([ids[:64]])  # warm up
        glm2rs.cuda_memory("cuda", reset_peak=True)
        pre = []
        for _ in range(3):
            t = time.perf_counter()
            m.last_logits([ids])  # waits for the result
            pre.append(time.perf_counter() - t)
        r["prefill_2048_s"] = min(pre)
        mem = glm2rs.cuda_memory("cuda")
    r["peak_gib_prefill"] = pm.peak / 1024
    # allocator-side, as torch.cuda.max_memory_allocated (the official 12.5 GiB figure)
    r["allocated_peak_gib_prefill"] = mem["used_peak"] / 2**30
    r["reserved_peak_gib_prefill"] = mem["reserved_peak"] / 2**30
    def decode_b1(m=m) -> tuple[float, list[int]]:
        s = m.stream_ids(ids[:32], max_new_tokens=8)
        for _ in s:
            pass
        dec = []
        for _ in range(2):
            s = m.stream_ids(ids[:32], max_new_tokens=decode_tokens + 1)
            t_first, n_first = None, 0
            for _ in s:
                if t_first is None:
                    t_first, n_first = time.perf_counter(), len(s.token_ids)
            dec.append((len(s.token_ids) - n_first) / (time.perf_counter() - t_first))
        return max(dec), list(s.token_ids)

    r["decode_b1_tok_s"], graph_ids = decode_b1()
    if compare_graph:
        # the same steps launched one by one from the host (no CUDA graph), same process
        r["decode_b1_eager_tok_s"], eager_ids = decode_b1(m.with_tuning(cuda_graph=False))
        r["decode_b1_graph_ids_equal"] = graph_ids == eager_ids
    for b in batches:
        prompts = [[64790, 64792] + [int(x) for x in rng.integers(100, 60000, 30)] for _ in range(b)]
        t = time.perf_counter()
        m.generate_batch_ids(prompts, max_new_tokens=1)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        out = m.generate_batch_ids(prompts, max_new_tokens=65)
        t65 = time.perf_counter() - t
        n = sum(len(o) for o in out)
        r[f"decode_b{b}_tok_s"] = (n - b) / max(t65 - t1, 1e-9)
    RESULTS.setdefault("figures", {})[label] = r
    log(f"{label}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    del m


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--parity", action="store_true")
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--quant", default="")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--num-gpus", type=int, default=1)
    ap.add_argument("--ckpt", default="/tmp/glm6b")
    ap.add_argument("--out")
    ap.add_argument("--baseline", action="store_true", help="also time the decode without the fused kernels")
    ap.add_argument("--big-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--long", action="store_true", help="bf16 prefill of 8192 and 32768 tokens (6B)")
    ap.add_argument("--flash", action="store_true",
                    help="flash-attention prompts against the blocked path and float32 (6B checkpoint)")
    ap.add_argument("--graph", action="store_true",
                    help="CUDA graph checks: tiny models' greedy ids with and without graphs, and the 6B "
                         "batch-1 decode also timed without graphs")
    a = ap.parse_args()
    if a.big_only:
        figures("bf16 (GLM2RS_FUSED=0)", Path(a.ckpt), [int(x) for x in a.batches.split(",") if x],
                decode_tokens=64)
        return 0
    fx = Path(a.fixtures)
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip().splitlines()
    RESULTS["gpu"] = gpu
    log(f"GPUs: {gpu}; glm2rs {glm2rs.__version__}")
    batches = [int(x) for x in a.batches.split(",") if x]
    try:
        if a.graph:
            graph_check(fx)
        if a.parity:
            parity(fx)
            parity16(fx)
            if a.num_gpus > 1:
                parity(fx, a.num_gpus)
        if a.big or a.quant or a.num_gpus > 1 or a.flash or a.long:
            d = make_big(fx, Path(a.ckpt))
        if a.long:
            long_prefill(d)
        if a.flash:
            flash_check(d)
        if a.big:
            figures("bf16", d, batches, compare_graph=a.graph)
            if a.baseline:
                # the same with candle's own ops for the decode step (GLM2RS_FUSED=0), in a fresh process
                env = dict(os.environ, GLM2RS_FUSED="0")
                out = subprocess.run([sys.executable, __file__, "--fixtures", a.fixtures, "--ckpt", a.ckpt,
                                      "--big-only", "--batches", "16"], env=env, capture_output=True, text=True)
                log(out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:])
                if out.returncode == 0 and out.stdout.strip():
                    RESULTS["baseline_unfused"] = out.stdout.strip().splitlines()[-1]
        for q in [q for q in a.quant.split(",") if q]:
            figures(q, d, batches[:1], quantize=q, compare_graph=a.graph)
        if a.num_gpus > 1:
            figures(f"bf16 x{a.num_gpus} GPUs", d, [], num_gpus=a.num_gpus)
    finally:
        if a.out:
            Path(a.out).write_text(json.dumps(RESULTS, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
