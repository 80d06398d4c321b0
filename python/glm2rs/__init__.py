"""glm2rs: a fast inference engine for the ChatGLM2-6B family, in Rust on candle.

    import glm2rs
    model = glm2rs.Model.from_pretrained("THUDM/chatglm2-6b")
    for piece in model.stream(model.tokenizer.build_prompt("你好"), max_new_tokens=64):
        print(piece, end="", flush=True)
"""

from ._glm2rs import (
    ChatSession,
    ChatStreamer,
    ChatTurn,
    CheckpointError,
    ConfigError,
    Glm2Error,
    InvalidArgumentError,
    LoadError,
    Model,
    TextStreamer,
    Tokenizer,
    TokenizerError,
    __version__,
)

__all__ = [
    "Model",
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
