"""glm2rs on Ray Serve: `glm2rs serve`'s HTTP surface over many replicas and machines.

    pip install "glm2rs[ray]"
    glm2rs ray-serve --model PATH --replicas 2            # a local Ray instance
    glm2rs ray-serve --model PATH --replicas 8 --address auto --device cuda   # join a cluster
    serve run glm2rs.ray:app_builder model=PATH replicas=2  # Ray's own CLI (or a config file)

The application has two deployments:
- `Glm2Replica`: one model and its continuous-batching engine per replica (`num_gpus` per replica
  on GPUs). The HTTP protocol is glm2rs's own Rust code (`glm2rs.HttpApp`: the routes, request
  parsing, response and error formatting, API key of `glm2rs serve`), fed each request's method,
  path, headers and body; the response comes back as an async stream of items, the same bytes
  `glm2rs serve` would send.
- `Glm2Ingress` (unless `prefix_routing=False`, where the replicas are the ingress themselves and
  Ray's proxy routes by load): receives the HTTP requests from Ray's proxy, picks the replica through
  `PrefixAffinityRouter` (a conversation goes back to the replica that holds its prefix cache
  unless that replica is busier than the least loaded one by more than a margin) and streams the
  answer back. A replica that dies before sending anything is retried on another one; a stream
  cut after its first bytes ends with an OpenAI-shaped error event and `[DONE]`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import sys
import threading
from collections import OrderedDict
from typing import Any, AsyncIterator, Optional

import ray
from ray import serve
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

__all__ = ["Glm2Ingress", "Glm2Replica", "PrefixAffinityRouter", "affinity_key", "app_builder", "build_app", "main"]

# request headers that describe the connection, not the request (the body is passed whole)
_HOP_HEADERS = {"connection", "content-length", "keep-alive", "transfer-encoding", "upgrade", "te"}


async def _forwarded(request: Request) -> tuple[str, str, list, bytes]:
    """What of a Starlette request goes to `HttpApp.request`: method, path with its query, headers
    (not the connection's), body."""
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    headers = [(k, v) for k, v in request.headers.items() if k not in _HOP_HEADERS]
    return request.method, path, headers, await request.body()


def _streaming(items, status: int, head: list) -> StreamingResponse:
    """A response of `status` with `head`'s headers (not the connection's) and the body `items`."""
    return StreamingResponse(items, status_code=status,
                             headers={k: v for k, v in head if k.lower() not in _HOP_HEADERS})


async def respond(app, method: str, path: str, headers: list, body: bytes,
                  interval: float = 0.0) -> AsyncIterator[Any]:
    """Run one request through a `glm2rs.HttpApp`: yields `(status, headers)`, then the body as
    bytes: the first two chunks at once, then at most one item per `interval` seconds holding every
    chunk produced meanwhile (a hop through Ray per item costs more than a token; Ray Serve LLM
    batches its streams the same way). Leaving the iteration early cancels the request."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def sink(item):  # called on the app's runtime threads
        loop.call_soon_threadsafe(queue.put_nowait, item)

    call = app.request(method, path, headers, body, sink)
    try:
        yield await queue.get()  # (status, headers)
        last = -float("inf")
        end = False
        sent = 0
        while not end:
            item = await queue.get()
            if item is None:
                return
            parts = [item]
            # the first two chunks at once: a chat stream's first carries only the role, the
            # second the first token
            deadline = last + interval if sent >= 2 else last
            while True:
                while not queue.empty() and not end:
                    more = queue.get_nowait()
                    if more is None:
                        end = True
                    else:
                        parts.append(more)
                remaining = deadline - loop.time()
                if end or remaining <= 0:
                    break
                try:
                    more = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                if more is None:
                    end = True
                else:
                    parts.append(more)
            yield b"".join(parts)
            sent += 1
            last = loop.time()
    finally:
        call.cancel()


def affinity_key(path: str, body: bytes) -> Optional[str]:
    """What identifies a conversation for routing: the system messages and the first user message
    of a chat (every later turn repeats them, so they lead its cached prefix), a completion
    prompt's first 1,024 characters, the official API's first history turn (or its prompt).
    None for anything else."""
    if not body:
        return None
    try:
        req = json.loads(body)
    except ValueError:
        return None
    if not isinstance(req, dict):
        return None
    head: Any = None
    if path.startswith("/v1/chat/completions"):
        msgs = req.get("messages")
        if isinstance(msgs, list):
            head = []
            for m in msgs:
                head.append(m)
                if isinstance(m, dict) and m.get("role") == "user":
                    break
    elif path.startswith("/v1/completions"):
        p = req.get("prompt")
        head = p[:1024] if isinstance(p, str) else json.dumps(p)[:1024]
    elif path.rstrip("/") == "":
        hist = req.get("history")
        head = hist[0] if isinstance(hist, list) and hist else req.get("prompt")
    if not head:
        return None
    text = json.dumps([req.get("model"), head], ensure_ascii=False, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router: requests with the same `affinity` keyword go to the replica that
    took the last one (its prefix cache holds their history), unless its queue is longer than the
    shortest by more than `imbalanced_threshold`; everything else goes to the least loaded replica."""

    def initialize_state(self, imbalanced_threshold: int = 16, max_keys: int = 100_000):
        self._threshold = imbalanced_threshold
        self._max_keys = max_keys
        self._owner: OrderedDict[str, ReplicaID] = OrderedDict()

    def _queue_len(self, r: RunningReplica) -> int:
        q = self._replica_queue_len_cache.get(r.replica_id)
        return 0 if q is None else q

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        key = (pending_request.kwargs or {}).get("affinity") if pending_request is not None else None
        owner = self._owner.get(key) if key else None
        if owner is not None:
            preferred = [r for r in candidate_replicas if r.replica_id == owner]
            others = [r for r in candidate_replicas if r.replica_id != owner]
            if preferred:
                low = min((self._queue_len(r) for r in others), default=0)
                if self._queue_len(preferred[0]) - low <= self._threshold:
                    # the owner first; when it is full, the least loaded of the others
                    return [preferred, others] if others else [preferred]
        return [candidate_replicas]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        key = (pending_request.kwargs or {}).get("affinity")
        if key:
            self._owner[key] = replica_id
            self._owner.move_to_end(key)
            while len(self._owner) > self._max_keys:
                self._owner.popitem(last=False)


class Glm2Replica:
    """One model and its engine; `handle` answers one HTTP request as a stream of items."""

    def __init__(self, model: str, load: Optional[dict] = None, server: Optional[dict] = None,
                 stream_interval: float = 0.02):
        import glm2rs

        self._model = glm2rs.Model.from_pretrained(model, **{"progress": False, **(load or {})})
        self._app = glm2rs.HttpApp(self._model, **(server or {}))
        self._interval = stream_interval

    async def handle(self, method: str, path: str, headers: list, body: bytes, affinity: Optional[str] = None):
        async for item in respond(self._app, method, path, headers, body, self._interval):
            yield item

    async def __call__(self, request: Request):
        """As the application's ingress itself (`prefix_routing=False`): Ray's proxy routes by load."""
        items = respond(self._app, *await _forwarded(request), self._interval)
        status, head = await items.__anext__()
        return _streaming(items, status, head)


def _error_body(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


class Glm2Ingress:
    """The HTTP entry: forwards each request to a replica (see `PrefixAffinityRouter`)."""

    def __init__(self, replicas, retries: int = 2):
        self._replicas = replicas
        self._retries = retries

    async def __call__(self, request: Request):
        method, path, headers, body = await _forwarded(request)
        key = affinity_key(request.url.path, body)
        last: Optional[BaseException] = None
        for _ in range(self._retries + 1):
            gen = self._replicas.options(stream=True).handle.remote(method, path, headers, body, affinity=key)
            try:
                status, head = await gen.__anext__()
                # nothing reaches the client before the first chunk: until then a dead replica is
                # retried on another one
                first = await _next_or_none(gen)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                last = e
                continue
            media = dict((k.lower(), v) for k, v in head).get("content-type", "")
            return _streaming(_rest(first, gen, media.startswith("text/event-stream")), status, head)
        return JSONResponse(_error_body(f"no replica could answer: {last}", "replica_unavailable"), status_code=503)


async def _next_or_none(gen):
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _rest(first: Optional[bytes], gen, sse: bool):
    if first is None:
        return
    yield first
    try:
        async for chunk in gen:
            yield chunk
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
        if sse:  # the stream ends as glm2rs serve ends a cut stream: an error event, then [DONE]
            err = _error_body(f"the replica serving this stream failed: {e.__class__.__name__}", "replica_failed")
            yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()


def build_app(model: str, *, replicas: int = 1, min_replicas: Optional[int] = None,
              max_replicas: Optional[int] = None, device: str = "cpu", dtype: str = "auto",
              quantize: Optional[str] = None, num_cpus: float = 1, num_gpus: Optional[float] = None,
              api_key: Optional[str] = None, model_name: Optional[str] = None, max_batch: int = 32,
              max_queue: int = 256, max_ongoing_requests: int = 256, target_ongoing_requests: int = 32,
              ingress_replicas: int = 1, imbalanced_threshold: int = 16, stream_interval: float = 0.02,
              prefix_routing: bool = True, load: Optional[dict] = None):
    """The Ray Serve application (bind it with `serve.run`). `replicas` fixed, or autoscaling on
    ongoing requests between `min_replicas` and `max_replicas` (`target_ongoing_requests` per
    replica). `num_gpus` per replica defaults to 1 on `device="cuda"`. `stream_interval`: seconds
    between the items a stream sends through Ray after its first two. `prefix_routing=False`: no
    ingress, the replicas take the requests (routed by load). `load`: more keywords of
    `Model.from_pretrained` (`kv_cache_memory`, `prefix_checkpoint`, ...)."""
    if replicas < 1 and min_replicas is None:
        raise ValueError("replicas must be at least 1")
    load = {"device": device, "dtype": dtype, **({"quantize": quantize} if quantize else {}), **(load or {})}
    name = model_name or os.path.basename(os.path.normpath(str(model))) or "chatglm2-6b"
    server = {"api_key": api_key, "model_name": name, "max_batch": max_batch, "max_queue": max_queue}
    gpus = num_gpus if num_gpus is not None else (1 if str(device).startswith("cuda") else 0)
    scale: dict = {"num_replicas": replicas}
    if min_replicas is not None or max_replicas is not None:
        lo = min_replicas if min_replicas is not None else 1
        hi = max_replicas if max_replicas is not None else max(lo, replicas)
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas, max_replicas >= 1 (got {lo}, {hi})")
        scale = {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                        "target_ongoing_requests": target_ongoing_requests}}
    replica = serve.deployment(
        Glm2Replica, name="Glm2Replica", max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": gpus},
        request_router_config={"request_router_class": PrefixAffinityRouter,
                               "request_router_kwargs": {"imbalanced_threshold": imbalanced_threshold}},
        health_check_period_s=2, **scale,
    ).bind(str(model), load, server, stream_interval)
    if not prefix_routing:
        return replica
    ingress = serve.deployment(Glm2Ingress, name="Glm2Ingress", num_replicas=ingress_replicas,
                               max_ongoing_requests=4 * max_ongoing_requests,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica)


def app_builder(args: dict):
    """For `serve run glm2rs.ray:app_builder model=PATH replicas=2 ...` and config files
    (`import_path: glm2rs.ray:app_builder`, `args: {...}`): `build_app`'s keywords, as strings."""
    args = dict(args)
    model = args.pop("model", None)
    if not model:
        raise ValueError("app_builder needs model=PATH (a model directory, GGUF file or hub id)")
    ints = {"replicas", "min_replicas", "max_replicas", "max_batch", "max_queue", "max_ongoing_requests",
            "target_ongoing_requests", "ingress_replicas", "imbalanced_threshold"}
    floats = {"num_cpus", "num_gpus", "stream_interval"}
    kw = {k: int(v) if k in ints else float(v) if k in floats else v for k, v in args.items()}
    return build_app(model, **kw)


def main(argv: Optional[list] = None) -> int:
    """`glm2rs ray-serve`: deploy on a local Ray instance (started here, stopped on Ctrl-C /
    SIGTERM) or on the cluster at `--address`."""
    ap = argparse.ArgumentParser(prog="glm2rs ray-serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 description="glm2rs's OpenAI-compatible server as a Ray Serve application")
    ap.add_argument("--model", required=True, help="model directory, GGUF file or hub id (read on every node)")
    ap.add_argument("--replicas", type=int, default=1, help="replicas (each loads the model)")
    ap.add_argument("--min-replicas", type=int, help="autoscale on ongoing requests from this many ...")
    ap.add_argument("--max-replicas", type=int, help="... to this many")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per replica)")
    ap.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    ap.add_argument("--quantize", help="8, 4, q8_0, q4_0, ... (as glm2rs serve)")
    ap.add_argument("--num-cpus", type=float, default=1, help="CPUs reserved per replica")
    ap.add_argument("--num-gpus", type=float, help="GPUs per replica (default: 1 with --device cuda)")
    ap.add_argument("--host", default="127.0.0.1", help="address of Ray's HTTP proxy (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=8000, help="port of Ray's HTTP proxy")
    ap.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set GLM2RS_API_KEY)")
    ap.add_argument("--model-name", help="model id shown by /v1/models (default: the directory name)")
    ap.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together per replica")
    ap.add_argument("--max-ongoing-requests", type=int, default=256, help="requests a replica takes at once")
    ap.add_argument("--no-prefix-routing", action="store_true",
                    help="no ingress: Ray's proxy sends requests straight to the replicas by load alone "
                         "(one hop less; conversations lose their replica's prefix cache)")
    ap.add_argument("--address", help="Ray cluster to join (e.g. auto, or ray://host:10001); none: start a local one")
    ap.add_argument("--lora-modules", nargs="+", metavar="NAME=DIR",
                    help="peft LoRA adapters beside the base model (as glm2rs serve): 'model': NAME picks one")
    args = ap.parse_args(argv)
    from .cli import lora_modules

    api_key = args.api_key if args.api_key is not None else os.environ.get("GLM2RS_API_KEY")
    app = build_app(args.model, replicas=args.replicas, min_replicas=args.min_replicas,
                    max_replicas=args.max_replicas, device=args.device, dtype=args.dtype, quantize=args.quantize,
                    num_cpus=args.num_cpus, num_gpus=args.num_gpus, api_key=api_key, model_name=args.model_name,
                    max_batch=args.max_batch, max_ongoing_requests=args.max_ongoing_requests,
                    prefix_routing=not args.no_prefix_routing,
                    load={"adapters": lora_modules(args.lora_modules)} if args.lora_modules else None)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    local = args.address is None
    try:
        ray.init(**({"include_dashboard": False} if local else {"address": args.address}), log_to_driver=False)
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="glm2rs", route_prefix="/")
        url = f"http://{args.host}:{args.port}"
        print(f"glm2rs on Ray Serve: {args.replicas if args.min_replicas is None else 'autoscaled'} replica(s) "
              f"of {args.model} at {url} (OpenAI API at {url}/v1{', API key required' if api_key else ''}); "
              f"{'Ctrl-C stops' if local else 'Ctrl-C removes the application'}", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping", file=sys.stderr, flush=True)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if ray.is_initialized():
            try:
                if local:
                    serve.shutdown()
                else:
                    serve.delete("glm2rs")
            finally:
                ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
