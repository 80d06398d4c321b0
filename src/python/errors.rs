//! The `glm2rs.Glm2Error` hierarchy and the one place where Rust errors become Python
//! exceptions.

use crate::error::Error;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    glm2rs,
    Glm2Error,
    PyException,
    "Base class of every glm2rs error."
);
create_exception!(
    glm2rs,
    LoadError,
    Glm2Error,
    "A file or directory could not be read."
);
create_exception!(
    glm2rs,
    ConfigError,
    Glm2Error,
    "config.json is malformed or asks for something unsupported."
);
create_exception!(
    glm2rs,
    CheckpointError,
    Glm2Error,
    "A weight file is missing, truncated or has a wrong tensor."
);
create_exception!(
    glm2rs,
    TokenizerError,
    Glm2Error,
    "The tokenizer could not be built or used."
);
create_exception!(
    glm2rs,
    InvalidArgumentError,
    Glm2Error,
    "An argument is out of range (prompt too long, bad sampling value, ...)."
);

/// The one place where Rust errors become Python exceptions.
impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        match e {
            Error::Io { .. } => LoadError::new_err(msg),
            Error::Config(_) => ConfigError::new_err(msg),
            Error::Checkpoint { .. } => CheckpointError::new_err(msg),
            Error::Tokenizer(_) => TokenizerError::new_err(msg),
            Error::InvalidArgument(_) => InvalidArgumentError::new_err(msg),
            Error::Internal(_) | Error::Candle(_) | Error::Overloaded(_) => Glm2Error::new_err(msg),
        }
    }
}

/// Register the exception classes on the extension module.
pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Glm2Error", py.get_type::<Glm2Error>())?;
    m.add("LoadError", py.get_type::<LoadError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("CheckpointError", py.get_type::<CheckpointError>())?;
    m.add("TokenizerError", py.get_type::<TokenizerError>())?;
    m.add(
        "InvalidArgumentError",
        py.get_type::<InvalidArgumentError>(),
    )?;
    Ok(())
}
