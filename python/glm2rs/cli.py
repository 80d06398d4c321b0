"""The `glm2rs` command: `glm2rs quantize SRC DST --type q4_0`, `glm2rs generate -p TEXT`."""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import Glm2Error, Model


def _load(args, **kw) -> Model:
    return Model.from_pretrained(args.model, revision=getattr(args, "revision", None), device=args.device,
                                 dtype=args.dtype, progress=True, **kw)


def cmd_quantize(args) -> int:
    t0 = time.perf_counter()
    model = Model.from_pretrained(args.src, revision=args.revision, device="cpu", dtype=args.dtype,
                                  quantize=args.type, progress=True)
    t1 = time.perf_counter()
    print(f"quantized to {model.quantization} in {t1 - t0:.1f} s ({model.weight_bytes / 2**30:.2f} GiB of weights)",
          file=sys.stderr)
    model.save_quantized(args.dst)
    size = os.path.getsize(args.dst)
    print(f"wrote {args.dst}: {size / 2**30:.2f} GiB in {time.perf_counter() - t1:.1f} s", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    model = _load(args, quantize=args.quantize)
    prompt = args.prompt if args.raw else model.tokenizer.build_prompt(args.prompt, [])
    t0 = time.perf_counter()
    stream = model.stream(prompt, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                          temperature=args.temperature or 1.0, top_p=args.top_p, seed=args.seed)
    first = None
    for piece in stream:
        if first is None:
            first = time.perf_counter()
        print(piece, end="", flush=True)
    end = time.perf_counter()
    n = len(stream.token_ids)
    rate = (n - 1) / (end - first) if first and n > 1 and end > first else 0.0
    print(f"\n[{n} tokens, first after {((first or end) - t0):.2f} s, {rate:.2f} tokens/s]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="glm2rs", description="ChatGLM2/3 inference in Rust")
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a checkpoint into one GGUF file")
    q.add_argument("src", help="model directory or hub id")
    q.add_argument("dst", help="output .gguf file")
    q.add_argument("--type", default="q4_0", help="8, 4 (official schemes), q8_0, q4_0, q4_1, q5_0, q5_1, q4k, ...")
    q.add_argument("--dtype", default="float16", help="dtype of the layers that stay dense")
    q.add_argument("--revision")
    q.set_defaults(func=cmd_quantize)

    g = sub.add_parser("generate", help="stream a completion and show tokens/s")
    g.add_argument("--model", required=True)
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="use the prompt as is (no [Round 1] chat format)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--quantize")
    g.add_argument("--revision")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.set_defaults(func=cmd_generate)

    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except Glm2Error as e:
        print(f"glm2rs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
