from typing import Callable, Iterator, Mapping, Sequence, TypedDict

from typing_extensions import Unpack

import numpy as np
import numpy.typing as npt

__version__: str

class GenerationKwargs(TypedDict, total=False):
    """Keywords of every generating method. Defaults: greedy for generate/stream; the official
    chat defaults (do_sample=True, temperature=0.8, top_p=0.8, max_length=8192) for chat."""

    max_new_tokens: int | None
    max_length: int | None
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int | None
    stop_token_ids: Sequence[int] | None
    stop: str | Sequence[str] | None
    logprobs: int | None
    """Record each generated token's log-probability (log_softmax of the model's logits) and
    this many likeliest alternatives (0-20)."""
    adapter: str | None
    """Generate with this LoRA adapter (one of `Model.adapters`, loaded with `adapters=`)."""

def cuda_memory(device: str = "cuda", reset_peak: bool = False) -> dict[str, int]: ...
def build_info() -> dict:
    """What this build can use here: version, features (cuda, metal, server, python), cpu
    (vector extensions present), gpus ({index, name, compute_capability, memory_bytes}) and
    cuda_problem (why CUDA cannot be used, or None)."""

class Glm2Error(Exception): ...
class LoadError(Glm2Error): ...
class ConfigError(Glm2Error): ...
class CheckpointError(Glm2Error): ...
class TokenizerError(Glm2Error): ...
class InvalidArgumentError(Glm2Error): ...

class Tokenizer:
    @staticmethod
    def from_file(path: str, *, chatglm3: bool = False) -> Tokenizer: ...
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def stream_decode(self, ids: Sequence[int]) -> list[str]: ...
    def build_prompt(self, query: str, history: Sequence[tuple[str, str]] | None = None) -> str: ...
    def build_chat_input(self, query: str, history: History | None = None, role: str = "user") -> list[int]: ...
    def save(self, path: str) -> None: ...
    def special_id(self, name: str) -> int | None: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_token_id(self) -> int | None: ...
    def __len__(self) -> int: ...

History = Sequence[tuple[str, str]] | Sequence[dict[str, str]]

class ChatStreamer(Iterator[str]):
    def __iter__(self) -> ChatStreamer: ...
    def __next__(self) -> str: ...
    @property
    def response(self) -> str: ...
    @property
    def history(self) -> list: ...
    @property
    def finish_reason(self) -> str | None: ...

class ChatTurn(Iterator[str]):
    def __iter__(self) -> ChatTurn: ...
    def __next__(self) -> str: ...
    def close(self) -> None: ...
    @property
    def generated_tokens(self) -> int:
        """Tokens generated so far in this turn (not the turn's prompt)."""
    @property
    def response(self) -> str: ...
    @property
    def tool_call(self) -> dict[str, str] | None:
        """Sessions with tools, once finished: `{"name", "arguments" (JSON text)}` of the call the
        answer made, or None for a text answer."""

class ChatSession:
    def send(
        self,
        query: str,
        role: str = "user",
        **kwargs: Unpack[GenerationKwargs],
    ) -> ChatTurn:
        """`role="observation"`: a tool's result (ChatGLM3)."""
    def chat(self, query: str, role: str = "user", **kwargs) -> str: ...
    @property
    def history(self) -> list: ...
    @property
    def token_ids(self) -> list[int]: ...
    def reset(self) -> None: ...

class TextStreamer(Iterator[str]):
    def __iter__(self) -> TextStreamer: ...
    def __next__(self) -> str: ...
    def close(self) -> None: ...
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def cached_tokens(self) -> int:
        """Prompt tokens found in the prefix cache (their keys and values not computed again)."""
    @property
    def logprobs(self) -> list[dict]:
        """With `logprobs=k`: per generated token {"token", "logprob", "top_logprobs": [(id, logprob)]}."""

class Model:
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        revision: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        quantize: str | int | None = None,
        prefix_checkpoint: str | None = None,
        chat_format: str | None = None,
        progress: bool | None = None,
        num_gpus: int = 1,
        kv_cache_memory: float | int | str | None = None,
        kv_block_size: int = 16,
        prefix_cache: bool = True,
        adapter: str | None = None,
        adapters: Mapping[str, str] | None = None,
    ) -> Model:
        """A local directory, GGUF file or hub id (resolved by `glm2rs.hub` in Python first).
        `adapter`: a peft LoRA adapter directory (adapter_config.json + adapter_model.safetensors
        or .bin), merged into the float weights at load, before `quantize`.
        `adapters`: {name: directory} of peft LoRA adapters kept beside the weights, unmerged: a
        call with `adapter=name` (or a server request whose `model` is name) runs with it, and
        sequences of different adapters are batched together.
        `num_gpus` > 1 splits the layers over GPUs `device`..`device + num_gpus - 1`.
        `kv_cache_memory`: the most the paged KV cache may take: a share of the memory free once
        the weights are loaded (default 0.9) or bytes (an int, or "8GiB"); it grows as needed.
        `kv_block_size`: positions per KV block (a power of two from 16 to 1024).
        `prefix_cache`: reuse the keys and values of prompt starts already computed."""
    @classmethod
    def _from_local(
        cls,
        path: str,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        quantize: str | int | None = None,
        prefix_checkpoint: str | None = None,
        chat_format: str | None = None,
        progress: bool | None = None,
        num_gpus: int = 1,
        kv_cache_memory: float | int | str | None = None,
        kv_block_size: int = 16,
        prefix_cache: bool = True,
        adapter: str | None = None,
        adapters: Mapping[str, str] | None = None,
    ) -> Model:
        """A local directory or GGUF file only (what `from_pretrained` calls)."""
    @property
    def adapters(self) -> list[str]:
        """Names of the LoRA adapters loaded beside the weights (`adapters=`)."""
    @property
    def adapter(self) -> str | None:
        """The adapter every call of this model runs with (see `with_adapter`), or None."""
    def with_adapter(self, name: str | None) -> Model:
        """This model (everything shared) running every call, chat sessions included, with the
        adapter `name` of `adapters`; None: the base model."""
    def with_tuning(
        self,
        *,
        fused: bool | None = None,
        flash: bool | None = None,
        cuda_graph: bool | None = None,
        split_decode: bool | None = None,
        prefill_chunk: int | None = None,
        wgmma: bool | None = None,
    ) -> Model:
        """The same weights (shared) with other step-time switches (CUDA ones, and
        `prefill_chunk`: prompt tokens fed per step, 0 for all at once)."""
    @property
    def tuning(self) -> dict[str, str]:
        """Every tuning switch this model runs with (see the README's tuning table)."""
    def kv_cache_info(self) -> dict[str, int]:
        """The KV cache's block pool: block_size, block_bytes, blocks_in_use, blocks_allocated,
        max_blocks, blocks_cached, prefix_cache, prefix_cache_queries, prefix_cache_hits."""
    @property
    def num_gpus(self) -> int: ...
    @property
    def config(self) -> dict: ...
    @property
    def tokenizer(self) -> Tokenizer: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def chat_format(self) -> str: ...
    def chat(
        self,
        query: str,
        history: History | None = None,
        **kwargs: Unpack[GenerationKwargs],
    ) -> tuple[str, list]: ...
    def stream_chat(
        self,
        query: str,
        history: History | None = None,
        **kwargs: Unpack[GenerationKwargs],
    ) -> ChatStreamer: ...
    def start_chat(self, system: str | None = None, tools: list[dict] | None = None) -> ChatSession:
        """`tools` (ChatGLM3): functions the model may call (OpenAI's tool list or function objects)."""
    def logits(self, input_ids: Sequence[int]) -> npt.NDArray[np.float32]: ...
    def generate_ids(
        self,
        input_ids: Sequence[int],
        **kwargs: Unpack[GenerationKwargs],
    ) -> list[int]: ...
    def stream(
        self,
        prompt: str,
        **kwargs: Unpack[GenerationKwargs],
    ) -> TextStreamer: ...
    def stream_ids(
        self,
        input_ids: Sequence[int],
        **kwargs: Unpack[GenerationKwargs],
    ) -> TextStreamer: ...
    @property
    def quantization(self) -> str | None: ...
    @property
    def weight_bytes(self) -> int: ...
    def save_quantized(self, path: str) -> None: ...
    def generate(
        self,
        prompt: str,
        **kwargs: Unpack[GenerationKwargs],
    ) -> str | tuple[str, list[dict]]:
        """The completion; with `logprobs=k`, `(text, logprobs)` as `TextStreamer.logprobs`."""
    def generate_batch(
        self,
        prompts: list[str],
        **kwargs: Unpack[GenerationKwargs],
    ) -> list[str]:
        """One batched forward per step for all prompts; each text equals `generate(prompt)`."""
    def generate_batch_ids(
        self,
        input_ids: list[list[int]],
        **kwargs: Unpack[GenerationKwargs],
    ) -> list[list[int]]: ...
    def last_logits(self, input_ids: list[list[int]], batch_size: int = 8) -> npt.NDArray[np.float32]:
        """Last-position logits of each id list (each in its own context): [len(input_ids), vocab]."""

class Server:
    """The HTTP server (api.py contract, OpenAI API with streaming, web chat page) on its own
    threads, batching all requests in one engine. A context manager; `stop()` ends it."""
    def __init__(
        self,
        model: Model,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        model_name: str | None = None,
        max_batch: int = 32,
        max_queue: int = 256,
        allow_origins: list[str] | None = None,
        header_timeout: float = 10.0,
        max_connections: int = 1024,
    ) -> None:
        """Without `api_key`, only pages of the server's own origin or of `allow_origins` may
        call it; on a loopback host only loopback names are served; POST bodies must be JSON.
        A connection must send each request's headers within `header_timeout` seconds (an idle
        one is closed after it); at most `max_connections` are open at once."""
    @property
    def port(self) -> int: ...
    @property
    def host(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def running(self) -> bool: ...
    def stop(self) -> None: ...
    def __enter__(self) -> Server: ...
    def __exit__(self, *args: object) -> None: ...

class HttpApp:
    """The HTTP surface of `Server` (routes, request parsing, response and error formatting,
    API key, web-origin rules) without a socket, for a host that owns the connections (Ray
    Serve replicas: `glm2rs.ray`). Its engine starts with it."""
    def __init__(
        self,
        model: Model,
        api_key: str | None = None,
        model_name: str | None = None,
        max_batch: int = 32,
        max_queue: int = 256,
        allow_origins: list[str] | None = None,
        loopback: bool = False,
    ) -> None: ...
    @property
    def model_name(self) -> str: ...
    def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        sink: Callable[[tuple[int, list[tuple[str, str]]] | bytes | None], object],
    ) -> HttpCall:
        """Start one request (`path` with its query string). `sink` is called from the app's
        threads with `(status, headers)`, then each body chunk as bytes, then None; keep the
        returned call until then (dropping it cancels the request)."""

class HttpCall:
    """One request of an `HttpApp` in flight."""
    def cancel(self) -> None:
        """Drop the response: a stream's generation stops as on a closed connection."""
    @property
    def done(self) -> bool: ...
