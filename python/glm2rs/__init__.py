"""glm2rs: a fast inference engine for the ChatGLM2-6B family, in Rust on candle.

    import glm2rs
    model = glm2rs.Model.from_pretrained("THUDM/chatglm2-6b")
    for piece in model.stream(model.tokenizer.build_prompt("你好"), max_new_tokens=64):
        print(piece, end="", flush=True)
"""

def _preload_cuda_runtime() -> None:
    """CUDA builds link libcudart.so.13; load it from the nvidia-cuda-runtime wheel when the
    system loader path lacks it. Does nothing for CPU builds or when it cannot be found."""
    import ctypes
    import importlib.util
    import os

    spec = importlib.util.find_spec("nvidia")
    for base in list(spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13/lib", "cuda_runtime/lib"):
            path = os.path.join(base, sub, "libcudart.so.13")
            if os.path.exists(path):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    continue
                return


_preload_cuda_runtime()

from . import hub as _hub  # noqa: E402
from ._glm2rs import (  # noqa: E402
    ChatSession,
    ChatStreamer,
    ChatTurn,
    CheckpointError,
    ConfigError,
    Glm2Error,
    HttpApp,
    HttpCall,
    InvalidArgumentError,
    LoadError,
    Model,
    Server,
    TextStreamer,
    Tokenizer,
    TokenizerError,
    __version__,
    build_info,
    cuda_memory,
)



def _from_pretrained(cls, name_or_path, *, revision=None, **kwargs):
    """Load a local model directory, a GGUF file or a Hugging Face hub id (a snapshot of the
    files glm2rs reads, through huggingface_hub). Keywords: `device`, `dtype`, `quantize`,
    `prefix_checkpoint`, `chat_format`, `progress`, `num_gpus` (see the README)."""
    return cls._from_local(_hub.resolve(str(name_or_path), revision), **kwargs)


# The hub is resolved here, in Python, before the extension loads anything: the extension never
# calls back into the package.
Model.from_pretrained = classmethod(_from_pretrained)

__all__ = [
    "Model",
    "build_info",
    "cuda_memory",
    "Server",
    "HttpApp",
    "HttpCall",
    "ChatSession",
    "ChatTurn",
    "ChatStreamer",
    "Tokenizer",
    "TextStreamer",
    "Glm2Error",
    "LoadError",
    "ConfigError",
    "CheckpointError",
    "TokenizerError",
    "InvalidArgumentError",
    "__version__",
]
