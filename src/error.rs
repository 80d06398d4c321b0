//! The one error type of glm2rs. The Python bindings map each variant to a
//! `glm2rs.Glm2Error` subclass in a single place (`python.rs`).

use std::path::PathBuf;

/// Every failure glm2rs reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `config.json` is missing a key, has a malformed value, or asks for
    /// something the engine does not support.
    #[error("config: {0}")]
    Config(String),

    /// A checkpoint file is missing, truncated or holds a tensor of the wrong shape.
    #[error("checkpoint {file}: {message}")]
    Checkpoint { file: PathBuf, message: String },

    /// Building or using the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A request the engine refuses: a prompt longer than the context, an
    /// out-of-range sampling parameter, an unknown device or dtype string.
    #[error("{0}")]
    InvalidArgument(String),

    /// The engine is at capacity (its request queue is full); retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),

    /// A bug: an internal invariant failed (a caught panic). Please report it.
    #[error("internal error: {0}")]
    Internal(String),

    /// An error inside candle (tensor maths, device).
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Run `f`, turning a panic into [`Error::Internal`] so that no panic crosses an API boundary.
pub fn catch_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_string());
            Err(Error::Internal(msg))
        }
    }
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn checkpoint(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            file: file.into(),
            message: message.into(),
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::Config(message.into())
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }
}
