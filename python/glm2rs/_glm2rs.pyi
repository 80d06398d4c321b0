from typing import Iterator, Sequence

import numpy as np
import numpy.typing as npt

__version__: str

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
    def response(self) -> str: ...

class ChatSession:
    def send(
        self,
        query: str,
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool = True,
        temperature: float = 0.8,
        top_p: float = 0.8,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> ChatTurn: ...
    def chat(self, query: str, **kwargs) -> str: ...
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
    ) -> Model: ...
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
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = 8192,
        do_sample: bool = True,
        temperature: float = 0.8,
        top_p: float = 0.8,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> tuple[str, list]: ...
    def stream_chat(
        self,
        query: str,
        history: History | None = None,
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = 8192,
        do_sample: bool = True,
        temperature: float = 0.8,
        top_p: float = 0.8,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> ChatStreamer: ...
    def start_chat(self, system: str | None = None) -> ChatSession: ...
    def logits(self, input_ids: Sequence[int]) -> npt.NDArray[np.float32]: ...
    def generate_ids(
        self,
        input_ids: Sequence[int],
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> list[int]: ...
    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> TextStreamer: ...
    def stream_ids(
        self,
        input_ids: Sequence[int],
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> TextStreamer: ...
    @property
    def quantization(self) -> str | None: ...
    @property
    def weight_bytes(self) -> int: ...
    def save_quantized(self, path: str) -> None: ...
    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> str: ...
