"""The `glm2rs` command: `glm2rs chat --model M`, `glm2rs quantize SRC DST --type q4_0`,
`glm2rs generate -p TEXT`, `glm2rs serve --model M --port 8000`, `glm2rs bench --model M`,
`glm2rs eval ceval --model M --data DIR`, `glm2rs eval ppl --model M --file TEXT`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from . import Glm2Error, Model, Server, __version__


def _load(args, **kw) -> Model:
    return Model.from_pretrained(args.model, revision=getattr(args, "revision", None), device=args.device,
                                 dtype=args.dtype, progress=True, kv_cache_memory=args.kv_cache_memory,
                                 kv_block_size=args.block_size, prefix_cache=not args.no_prefix_cache,
                                 adapter=args.adapter, **kw)


WELCOME = "glm2rs chat: type a question; 'clear' empties the history, 'stop' (or Ctrl-D) exits."


def cmd_chat(args) -> int:
    model = _load(args, quantize=args.quantize)
    session = model.start_chat()
    print(WELCOME, flush=True)
    while True:
        try:
            query = input("\n用户：")
        except EOFError:
            print()
            return 0
        query = query.strip()
        if not query:
            continue
        if query == "stop":
            return 0
        if query == "clear":
            session.reset()
            print(WELCOME, flush=True)
            continue
        print("\nChatGLM：", end="", flush=True)
        t0 = time.perf_counter()
        turn = session.send(query, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                            temperature=args.temperature or 1.0, top_p=args.top_p)
        first = None
        try:
            for piece in turn:
                if first is None:
                    first = time.perf_counter()
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            turn.close()
        print(flush=True)
        print(turn_stats(t0, first, time.perf_counter(), turn.generated_tokens), flush=True)


def turn_stats(t0: float, first: float | None, end: float, generated: int) -> str:
    """`[N tokens, first after S s, R tokens/s]` for an answer: only the tokens generated (not the
    prompt's), the rate over those after the first (the first one waits for the prompt)."""
    if first is None or generated == 0:
        return f"[0 tokens in {end - t0:.2f} s]"
    rate = (generated - 1) / (end - first) if generated > 1 and end > first else 0.0
    return f"[{generated} tokens, first after {first - t0:.2f} s, {rate:.2f} tokens/s]"


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
    print(file=sys.stderr)
    print(turn_stats(t0, first, end, len(stream.token_ids)), file=sys.stderr)
    return 0


def lora_modules(specs: list[str] | None) -> dict[str, str]:
    """`NAME=DIR` pairs (vLLM's --lora-modules) as a dict; a bad pair is an error naming it."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"glm2rs: --lora-modules wants NAME=DIR, got {spec!r}")
        if name in out:
            raise SystemExit(f"glm2rs: --lora-modules names {name!r} twice")
        out[name] = path
    return out


def cmd_serve(args) -> int:
    model = _load(args, quantize=args.quantize, prefix_checkpoint=args.prefix_checkpoint,
                  adapters=lora_modules(args.lora_modules) or None)
    # an empty key is refused by Server (it would silently turn authentication off)
    api_key = args.api_key if args.api_key is not None else os.environ.get("GLM2RS_API_KEY")

    # SIGTERM (what Docker, systemd and Kubernetes send) stops as Ctrl-C does: no new connections,
    # requests in flight get the server's grace period, then the process exits 0
    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    server = None
    try:
        server = Server(model, host=args.host, port=args.port, api_key=api_key, model_name=args.model_name,
                        max_batch=args.max_batch, max_queue=args.max_queue, allow_origins=args.allow_origin or None,
                        header_timeout=args.header_timeout, max_connections=args.max_connections)
        print(f"glm2rs serving {args.model} at {server.url} (web chat at {server.url}/, OpenAI API at "
              f"{server.url}/v1{', API key required' if api_key else ''}); Ctrl-C stops", file=sys.stderr, flush=True)
        while server.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
        signal.signal(signal.SIGTERM, previous)
    return 0


def cmd_ray_serve(argv: list[str]) -> int:
    try:
        from . import ray as glm2rs_ray
    except ImportError as e:
        print(f"glm2rs ray-serve needs Ray Serve ({e}): pip install 'glm2rs[ray]'", file=sys.stderr)
        return 1
    try:
        return glm2rs_ray.main(argv)
    except (Glm2Error, OSError, ValueError) as e:
        print(f"glm2rs: {e}", file=sys.stderr)
        return 1


def cmd_bench(args) -> int:
    """Prefill and decode speed of one sequence, then aggregate decode speed of a batch."""
    t0 = time.perf_counter()
    model = _load(args, quantize=args.quantize)
    print(f"loaded in {time.perf_counter() - t0:.1f} s: {model.weight_bytes / 2**30:.2f} GiB of weights, "
          f"dtype {model.dtype}, device {model.device}", file=sys.stderr)
    vocab = min(model.tokenizer.vocab_size, model.config["padded_vocab_size"]) - 10
    prompt = [(7 * i + 100) % vocab + 5 for i in range(args.prompt_len)]
    results = {}
    for rep in range(args.repeat):
        t0 = time.perf_counter()
        model.logits(prompt)
        prefill = time.perf_counter() - t0
        first = None
        n_first = 0
        st = model.stream_ids(prompt, max_new_tokens=args.gen_len, do_sample=False)
        for _ in st:
            if first is None:
                first, n_first = time.perf_counter(), len(st.token_ids)
            if sys.stderr.isatty():  # redrawn in place on a terminal only; logs get the summary
                print(f"\r[run {rep + 1}/{args.repeat}] {len(st.token_ids)}/{args.gen_len} tokens", end="",
                      file=sys.stderr, flush=True)
        end = time.perf_counter()
        n = len(st.token_ids)
        decode = (n - n_first) / (end - first) if first is not None and n > n_first else 0.0
        if sys.stderr.isatty():
            print(file=sys.stderr)
        results.setdefault("prefill_tokens_per_s", []).append(args.prompt_len / prefill)
        results.setdefault("decode_tokens_per_s", []).append(decode)
    for k, v in results.items():
        print(f"{k}: best {max(v):.2f}, all {', '.join(f'{x:.2f}' for x in v)}")
    if args.batch > 1:
        prompts = [[(7 * i + 13 * b + 100) % vocab + 5 for i in range(args.prompt_len)] for b in range(args.batch)]
        t0 = time.perf_counter()
        out = model.generate_batch_ids(prompts, max_new_tokens=args.gen_len, do_sample=False)
        took = time.perf_counter() - t0
        total = sum(len(o) for o in out)
        print(f"batch {args.batch}: {total} tokens in {took:.2f} s = {total / took:.2f} tokens/s (prefill included)")
    return 0


def cmd_eval(args) -> int:
    import json

    from . import eval as ev

    model = _load(args, quantize=args.quantize, prefix_checkpoint=args.prefix_checkpoint)
    if args.task == "ceval":
        if not args.data:
            raise SystemExit("glm2rs eval ceval needs --data DIR")
        out = ev.ceval(model, args.data, answer_only=args.answer_only, shots=args.shots,
                       max_new_tokens=args.max_new_tokens, limit=args.limit, batch_size=args.batch_size)
    else:
        if not args.file:
            raise SystemExit("glm2rs eval ppl needs --file TEXT_FILE")
        text = open(args.file, encoding="utf-8").read()
        out = ev.perplexity(model, text, window=args.window, stride=args.stride)
    text = json.dumps(out, ensure_ascii=False, indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


def cmd_doctor(args) -> int:
    """What this installation can use: the wheel's features, the CPU's vector extensions the
    kernels pick from, the GPUs and why CUDA cannot be used (when it cannot)."""
    from . import build_info

    info = build_info()
    print(f"glm2rs {info['version']} (Python {sys.version.split()[0]})")
    print(f"built with: {', '.join(info['features']) or 'no optional features'}")
    print(f"CPU extensions used by the kernels: {', '.join(info['cpu']) or 'none detected (portable loops)'}")
    for g in info["gpus"]:
        print(f"GPU {g['index']}: {g['name']}, compute capability {g['compute_capability']}, "
              f"{g['memory_bytes'] / 2**30:.1f} GiB")
    if info["cuda_problem"]:
        print(f"CUDA: {info['cuda_problem']}")
    else:
        print("CUDA: usable (device=\"cuda\")")
    print(f"devices to pass: cpu{', cuda' if not info['cuda_problem'] else ''}"
          f"{', metal' if 'metal' in info['features'] else ''}")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    """The options that say which model to load and how (shared by the subcommands)."""
    p.add_argument("--model", required=True, help="model directory, .gguf file or hub id")
    p.add_argument("--device", default="cpu", help='"cpu", "cuda", "cuda:N" or "metal"')
    p.add_argument("--dtype", default="auto",
                   help="float32, float16 or bfloat16; auto: bfloat16 on CUDA, the checkpoint's on CPU")
    p.add_argument("--quantize", help="quantize at load: 8 or 4 (official schemes), q8_0, q4_0, ...")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of a hub id")
    p.add_argument("--kv-cache-memory", default="0.9",
                   help="most memory the paged KV cache may take: a share of what is free after the weights "
                        "(0.9) or bytes (8GiB, 512MiB); it grows as sequences need it")
    p.add_argument("--block-size", type=int, default=16,
                   help="positions per KV cache block (a power of two from 16 to 1024)")
    p.add_argument("--adapter", help="a peft LoRA adapter directory, merged into the weights at load")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="compute every prompt in full (no reuse of the keys and values of prompt starts already seen)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="glm2rs", description="ChatGLM2/3 inference in Rust",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--version", action="version", version=f"glm2rs {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def add(name: str, **kw) -> argparse.ArgumentParser:
        """A subcommand whose help shows each option's default."""
        return sub.add_parser(name, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kw)


    q = add("quantize", help="quantize a checkpoint into one GGUF file")
    q.add_argument("src", help="model directory or hub id")
    q.add_argument("dst", help="output .gguf file")
    q.add_argument("--type", default="q4_0", help="8, 4 (official schemes), q8_0, q4_0, q4_1, q5_0, q5_1, q4k, ...")
    q.add_argument("--dtype", default="float16", help="dtype of the layers that stay dense")
    q.add_argument("--revision", help="hub revision of a hub id")
    q.set_defaults(func=cmd_quantize)

    c = add("chat", help="interactive chat in the terminal (keeps the KV cache between turns)")
    _model_args(c)
    c.add_argument("--max-new-tokens", type=int, default=512, help="most tokens per answer")
    c.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0: greedy")
    c.add_argument("--top-p", type=float, default=0.8, help="nucleus sampling mass")
    c.set_defaults(func=cmd_chat)

    g = add("generate", help="stream a completion and show tokens/s")
    _model_args(g)
    g.add_argument("-p", "--prompt", required=True, help="the question (or the raw prompt with --raw)")
    g.add_argument("--raw", action="store_true", help="use the prompt as is (no [Round 1] chat format)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0: greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--seed", type=int, help="sampling seed (reproducible answers)")
    g.set_defaults(func=cmd_generate)

    e = add("eval", help="C-Eval accuracy or perplexity")
    _model_args(e)
    e.add_argument("task", choices=["ceval", "ppl"], help="C-Eval accuracy or perplexity of a text")
    e.add_argument("--data", help="C-Eval directory of .jsonl files (inputs_pretokenized, label)")
    e.add_argument("--answer-only", action="store_true", help="few-shot, score the answer letter directly")
    e.add_argument("--shots", type=int, default=5, help="examples from the dev split before each question")
    e.add_argument("--limit", type=int, help="at most this many questions per file")
    e.add_argument("--batch-size", type=int, default=8, help="questions run together (C-Eval)")
    e.add_argument("--max-new-tokens", type=int, default=512, help="most tokens per answer (chain of thought)")
    e.add_argument("--file", help="text file for perplexity")
    e.add_argument("--window", type=int, default=512, help="perplexity: tokens per window")
    e.add_argument("--stride", type=int, default=256, help="perplexity: tokens between window starts")
    e.add_argument("--output", help="also write the JSON here")
    e.add_argument("--prefix-checkpoint", help="P-Tuning v2 checkpoint directory")
    e.set_defaults(func=cmd_eval)

    s = add("serve", help="HTTP server: api.py contract, OpenAI API, web chat page")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set GLM2RS_API_KEY)")
    s.add_argument("--model-name", help="model id shown by /v1/models (default: the directory name)")
    s.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="a web origin (http://host:port) whose pages may call a server without an API key "
                        "(repeatable; the server's own pages always may)")
    s.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together")
    s.add_argument("--max-queue", type=int, default=256, help="most waiting requests; more get 503")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send a request's headers; idle ones are closed after it")
    s.add_argument("--max-connections", type=int, default=1024, help="most open connections")
    s.add_argument("--prefix-checkpoint", help="P-Tuning v2 checkpoint directory")
    s.add_argument("--lora-modules", nargs="+", metavar="NAME=DIR",
                   help="peft LoRA adapters served beside the base model, unmerged: a request whose "
                        "'model' is NAME runs with that adapter (several adapters batch together)")
    s.set_defaults(func=cmd_serve)

    b = add("bench", help="prefill and decode tokens/s (random prompt ids)")
    _model_args(b)
    b.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    b.add_argument("--gen-len", type=int, default=32, help="tokens to generate")
    b.add_argument("--batch", type=int, default=1, help="also time a batch of this many sequences")
    b.add_argument("--repeat", type=int, default=2, help="runs (the best is shown)")
    b.set_defaults(func=cmd_bench)

    d = add("doctor", help="what this installation can use: features, CPU extensions, GPUs")
    d.set_defaults(func=cmd_doctor)

    # its options are glm2rs.ray's own (glm2rs ray-serve --help); listed here for glm2rs --help
    add("ray-serve", help="the same server as a Ray Serve application: replicas over a Ray cluster "
                          "(pip install 'glm2rs[ray]')", add_help=False)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "ray-serve":
        return cmd_ray_serve(argv[1:])
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (Glm2Error, OSError, ValueError) as e:
        print(f"glm2rs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
