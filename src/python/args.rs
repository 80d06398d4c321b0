//! Arguments shared by the bindings: token ids from Python ints, and the generation keywords of
//! every generating method (defaults from [`GenerationDefaults`]).

use super::errors::InvalidArgumentError;
use crate::generate::{GenerationConfig, GenerationDefaults};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PyString, PyTuple};

/// Token ids from a Python sequence of ints. A str, a non-int item or an int outside u32 (negative,
/// or 2**64 and beyond, which the plain conversion would raise as `OverflowError`) is an
/// `InvalidArgumentError` naming `what`.
pub(super) fn ids(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u32>> {
    let not_ids = || InvalidArgumentError::new_err(format!("{what} must be a list of token ids"));
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(not_ids());
    }
    obj.try_iter()
        .map_err(|_| not_ids())?
        .map(|item| {
            let item = item?;
            match item.extract::<u32>() {
                Ok(id) if !item.is_instance_of::<PyBool>() => Ok(id),
                _ => Err(InvalidArgumentError::new_err(format!(
                    "{what}: {} is not a valid token id",
                    item.repr().map(|r| r.to_string()).unwrap_or_default()
                ))),
            }
        })
        .collect()
}

/// Several id lists (`ids` for each).
pub(super) fn id_lists(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<Vec<u32>>> {
    obj.try_iter()
        .map_err(|_| InvalidArgumentError::new_err(format!("{what} must be a list of id lists")))?
        .map(|item| ids(&item?, what))
        .collect()
}

/// Text from a Python str. A str that is not valid Unicode text (a lone surrogate, which the
/// plain conversion would raise as `UnicodeEncodeError`) is an `InvalidArgumentError` naming
/// `what`; anything but a str is a `TypeError` naming it.
pub(super) fn text(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    let s = obj.cast::<PyString>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what} must be a str, not {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })?;
    s.to_str().map(str::to_string).map_err(|_| {
        InvalidArgumentError::new_err(format!(
            "{what} is not valid Unicode text (it holds a lone surrogate)"
        ))
    })
}

/// Several texts (`text` for each).
pub(super) fn texts(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<String>> {
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(format!(
            "{what} must be a list of str"
        )));
    }
    obj.try_iter()
        .map_err(|_| PyTypeError::new_err(format!("{what} must be a list of str")))?
        .map(|item| text(&item?, what))
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
            "logprobs" => cfg.logprobs = count(&key, &v)?,
            "adapter" => cfg.adapter = v.extract::<Option<String>>().map_err(|_| bad(&key, &v))?,
            "stop_token_ids" => {
                cfg.stop_token_ids = if v.is_none() { vec![] } else { ids(&v, "stop_token_ids")? };
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
                     top_k, repetition_penalty, seed, stop_token_ids, stop, logprobs, adapter"
                )))
            }
        }
    }
    Ok(cfg)
}

/// Log-probabilities as Python dicts: `{"token": id, "logprob": float, "top_logprobs": [(id,
/// logprob), ...]}` per generated token.
pub(super) fn logprobs_to_py<'py>(
    py: Python<'py>,
    lps: &[crate::generate::TokenLogprob],
) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for l in lps {
        let d = PyDict::new(py);
        d.set_item("token", l.token)?;
        d.set_item("logprob", l.logprob)?;
        d.set_item("top_logprobs", l.top.clone())?;
        out.append(d)?;
    }
    Ok(out)
}
