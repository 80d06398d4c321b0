//! Arguments shared by the bindings: token ids from Python ints, and the generation keywords of
//! every generating method (defaults from [`GenerationDefaults`]).

use super::errors::InvalidArgumentError;
use crate::error::Error;
use crate::generate::{GenerationConfig, GenerationDefaults};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

/// Python ints as token ids; a negative or too large one is an `InvalidArgumentError` naming `what`.
pub(super) fn to_ids(ids: Vec<i64>, what: &str) -> Result<Vec<u32>, Error> {
    ids.into_iter()
        .map(|i| {
            u32::try_from(i)
                .map_err(|_| Error::invalid(format!("{what}: {i} is not a valid token id")))
        })
        .collect()
}

/// The generation keywords shared by every generating method, parsed in one place:
/// `max_new_tokens`, `max_length`, `do_sample`, `temperature`, `top_p`, `top_k`,
/// `repetition_penalty`, `seed`, `stop_token_ids`, `stop` (a string or a list of strings).
/// A wrong name, type or value is an `InvalidArgumentError`.
pub(super) fn gen_config(
    kwargs: Option<&Bound<'_, PyDict>>,
    d: GenerationDefaults,
) -> PyResult<GenerationConfig> {
    let mut cfg = d.config();
    let Some(kwargs) = kwargs else { return Ok(cfg) };
    fn bad(key: &str, v: &Bound<'_, PyAny>) -> PyErr {
        let shown = v.repr().map(|r| r.to_string()).unwrap_or_default();
        InvalidArgumentError::new_err(format!("{key}: {shown} is not a valid value"))
    }
    fn int(key: &str, v: &Bound<'_, PyAny>) -> PyResult<i64> {
        if v.is_instance_of::<pyo3::types::PyBool>() {
            return Err(bad(key, v));
        }
        v.extract::<i64>().map_err(|_| bad(key, v))
    }
    fn count(key: &str, v: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
        if v.is_none() {
            return Ok(None);
        }
        let n = int(key, v)?;
        usize::try_from(n)
            .map(Some)
            .map_err(|_| InvalidArgumentError::new_err(format!("{key} must be >= 0, got {n}")))
    }
    fn float(key: &str, v: &Bound<'_, PyAny>) -> PyResult<f64> {
        v.extract::<f64>().map_err(|_| bad(key, v))
    }
    for (k, v) in kwargs.iter() {
        let key: String = k.extract()?;
        match key.as_str() {
            "max_new_tokens" => cfg.max_new_tokens = count(&key, &v)?,
            "max_length" => cfg.max_length = count(&key, &v)?,
            "do_sample" => cfg.sampling.do_sample = v.extract::<bool>().map_err(|_| bad(&key, &v))?,
            "temperature" => cfg.sampling.temperature = float(&key, &v)?,
            "top_p" => cfg.sampling.top_p = float(&key, &v)?,
            "top_k" => cfg.sampling.top_k = count(&key, &v)?.unwrap_or(0),
            "repetition_penalty" => cfg.sampling.repetition_penalty = float(&key, &v)?,
            "seed" => {
                cfg.sampling.seed = if v.is_none() { None } else { Some(v.extract::<u64>().map_err(|_| bad(&key, &v))?) }
            }
            "stop_token_ids" => {
                let ids: Vec<i64> = if v.is_none() { vec![] } else { v.extract().map_err(|_| bad(&key, &v))? };
                cfg.stop_token_ids = to_ids(ids, "stop_token_ids")?;
            }
            "stop" => {
                cfg.stop_strings = if v.is_none() {
                    vec![]
                } else if let Ok(s) = v.extract::<String>() {
                    vec![s]
                } else if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() {
                    v.extract().map_err(|_| bad(&key, &v))?
                } else {
                    return Err(InvalidArgumentError::new_err("stop must be a string or a list of strings"));
                }
            }
            other => {
                return Err(InvalidArgumentError::new_err(format!(
                    "unknown keyword {other:?}: use max_new_tokens, max_length, do_sample, temperature, top_p, \
                     top_k, repetition_penalty, seed, stop_token_ids, stop"
                )))
            }
        }
    }
    Ok(cfg)
}
