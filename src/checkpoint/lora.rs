//! LoRA adapters saved by `peft` (`adapter_config.json` + `adapter_model.safetensors` or
//! `adapter_model.bin`), merged into the base weights as they are read: a checkpoint opened with
//! an adapter hands out `W + scale * B A` for every weight the adapter targets, before any dtype
//! conversion or quantization (as `peft`'s `merge_and_unload` before quantizing).
//!
//! What peft does, followed here (peft `tuners/lora/layer.py`, `LoraLayer.update_layer` and
//! `Linear.get_delta_weight`): `scaling = lora_alpha / r` (`lora_alpha / sqrt(r)` with
//! `use_rslora`), `delta = transpose(lora_B @ lora_A, fan_in_fan_out) * scaling`, where `lora_A`
//! is `[r, in_features]` and `lora_B` `[out_features, r]`. `fan_in_fan_out` only transposes for
//! weights stored `[in, out]` (GPT-2's Conv1D); ChatGLM's layers are `nn.Linear` (`[out, in]`),
//! for which peft turns the flag off (`_create_new_module`: "fan_in_fan_out is set to True but
//! the target module is torch.nn.Linear. Setting fan_in_fan_out to False"): so the delta is
//! `B A` whatever the flag says. `rank_pattern` / `alpha_pattern` give other ranks or alphas to
//! modules whose name ends with a key (peft matches `(.*\.)?{key}$`; where several keys match,
//! the longest decides). Saved keys are
//! `base_model.model.{module}.lora_A.weight` (older peft: `.lora_A.default.weight`); with
//! `bias` other than `"none"` the adapter also carries trained biases, which replace the base
//! ones: `{module}.base_layer.bias` (peft >= 0.7 wraps the layer; checked against adapters made
//! by peft 0.21 in `tests/test_lora_peft.py`) or `{module}.bias` (older peft).

use super::Checkpoint;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One targeted weight: `B A` (`[out, in]`, float32) and its scale.
struct Delta {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

/// A peft LoRA adapter read into memory, merged by [`Checkpoint::get`].
pub struct LoraAdapter {
    dir: PathBuf,
    /// `{module}.weight` -> its low-rank update.
    deltas: HashMap<String, Delta>,
    /// `{module}.bias` -> a trained bias replacing the base one.
    biases: HashMap<String, Tensor>,
    /// Names merged so far (every one must be, or the adapter does not fit the model).
    used: Mutex<BTreeSet<String>>,
}

#[derive(serde::Deserialize)]
struct AdapterConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    rank_pattern: HashMap<String, usize>,
    #[serde(default)]
    alpha_pattern: HashMap<String, f64>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
}

/// peft's `(.*\.)?{key}$` for plain keys: the module is the key or ends with `.key`.
fn pattern_matches(key: &str, module: &str) -> bool {
    module == key || module.ends_with(&format!(".{key}"))
}

/// The `rank_pattern` / `alpha_pattern` value for `module`. peft takes the first matching key in
/// the pattern's order; JSON objects are read here without their order, so where several keys
/// match the longest (the most specific) decides.
fn pattern<T: Copy>(patterns: &HashMap<String, T>, module: &str) -> Option<T> {
    patterns
        .iter()
        .filter(|(k, _)| pattern_matches(k, module))
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| *v)
}

impl LoraAdapter {
    /// Read the adapter in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let cfg: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| Error::config(format!("{}: {e}", cfg_path.display())))?;
        let bad = |msg: String| Error::config(format!("{}: {msg}", cfg_path.display()));
        match cfg.peft_type.as_deref() {
            Some("LORA") | None => {}
            Some(other) => {
                return Err(bad(format!(
                    "peft_type {other}: only LoRA adapters can be merged"
                )))
            }
        }
        if cfg.use_dora {
            return Err(bad("use_dora: DoRA adapters are not supported".into()));
        }
        if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(bad(
                "modules_to_save: adapters that replace whole modules are not supported".into(),
            ));
        }
        if cfg.r == 0 || !(cfg.lora_alpha.is_finite()) {
            return Err(bad(format!("r {} / lora_alpha {}", cfg.r, cfg.lora_alpha)));
        }
        for key in cfg.rank_pattern.keys().chain(cfg.alpha_pattern.keys()) {
            if key.chars().any(|c| "\\^$*+?()[]{}|".contains(c)) {
                return Err(bad(format!(
                    "rank/alpha pattern {key:?}: only plain module names are supported"
                )));
            }
        }
        let files: Vec<PathBuf> = ["adapter_model.safetensors", "adapter_model.bin"]
            .iter()
            .map(|f| dir.join(f))
            .filter(|p| p.is_file())
            .take(1)
            .collect();
        if files.is_empty() {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no adapter_model.safetensors or adapter_model.bin",
                ),
            ));
        }
        let ckpt = Checkpoint::open_files(&files)?;
        let file = files[0].clone();
        let mut pairs: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        let mut biases = HashMap::new();
        for key in ckpt.tensor_names() {
            let name = key.strip_prefix("base_model.model.").unwrap_or(&key);
            let read = || -> Result<Tensor> {
                let (t, _, _) = ckpt.read_checked(&key, &ckpt.shape(&key).unwrap_or_default())?;
                Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
            };
            let lora = [
                ".lora_A.weight",
                ".lora_A.default.weight",
                ".lora_B.weight",
                ".lora_B.default.weight",
            ]
            .iter()
            .find_map(|s| name.strip_suffix(s).map(|m| (m, s.contains("lora_A"))));
            if let Some((module, is_a)) = lora {
                let e = pairs.entry(module.to_string()).or_default();
                if is_a {
                    e.0 = Some(read()?);
                } else {
                    e.1 = Some(read()?);
                }
            } else if let Some(module) = name.strip_suffix(".bias") {
                // peft >= 0.7 wraps the targeted layer (`{module}.base_layer`) and saves its
                // trained bias under that name; older peft saved `{module}.bias`.
                let module = module.strip_suffix(".base_layer").unwrap_or(module);
                biases.insert(format!("{module}.bias"), read()?);
            } else {
                return Err(Error::checkpoint(
                    &file,
                    format!("{key}: not a LoRA matrix or bias (modules_to_save, embeddings or DoRA are not supported)"),
                ));
            }
        }
        let mut deltas = HashMap::new();
        for (module, (a, b)) in pairs {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(Error::checkpoint(
                    &file,
                    format!("{module}: lora_A and lora_B must both be present"),
                ));
            };
            let (r, _) = a.dims2()?;
            let (_, rb) = b.dims2()?;
            let rank = pattern(&cfg.rank_pattern, &module).unwrap_or(cfg.r);
            if r != rank || rb != rank {
                return Err(Error::checkpoint(
                    &file,
                    format!(
                        "{module}: lora_A is {:?} and lora_B {:?}, rank {rank} expected",
                        a.dims(),
                        b.dims()
                    ),
                ));
            }
            let alpha = pattern(&cfg.alpha_pattern, &module).unwrap_or(cfg.lora_alpha);
            let scale = if cfg.use_rslora {
                alpha / (rank as f64).sqrt()
            } else {
                alpha / rank as f64
            };
            deltas.insert(format!("{module}.weight"), Delta { a, b, scale });
        }
        if deltas.is_empty() && biases.is_empty() {
            return Err(Error::checkpoint(
                &file,
                "the adapter holds no LoRA weights",
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            deltas,
            biases,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// The directory the adapter was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every tensor name the adapter changes (`{module}.weight` for its low-rank updates,
    /// `{module}.bias` for trained biases), sorted.
    pub fn target_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .deltas
            .keys()
            .chain(self.biases.keys())
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// The low-rank update of weight `name`: `lora_A` `[r, in]`, `lora_B` `[out, r]` (float32 on
    /// the CPU) and its scale (the update is `scale * B A`).
    pub fn low_rank(&self, name: &str) -> Option<(&Tensor, &Tensor, f64)> {
        self.deltas.get(name).map(|d| (&d.a, &d.b, d.scale))
    }

    /// The trained bias replacing the base bias `name` (float32 on the CPU).
    pub fn trained_bias(&self, name: &str) -> Option<&Tensor> {
        self.biases.get(name)
    }

    /// Whether the adapter changes tensor `name`.
    pub fn targets(&self, name: &str) -> bool {
        self.deltas.contains_key(name) || self.biases.contains_key(name)
    }

    /// `t` (the base tensor `name`, read from the checkpoint) with the adapter merged in, as
    /// float32; `None` when the adapter does not touch it.
    pub(super) fn merge(&self, name: &str, t: &Tensor) -> Result<Option<Tensor>> {
        let fits = |what: &str, adapter: &Tensor| -> Result<()> {
            if adapter.dims() == t.dims() {
                return Ok(());
            }
            Err(Error::checkpoint(
                &self.dir,
                format!(
                    "{name}: the adapter's {what} is {:?}, the model's {:?}",
                    adapter.dims(),
                    t.dims()
                ),
            ))
        };
        let merged = if let Some(d) = self.deltas.get(name) {
            let delta = (d.b.matmul(&d.a)? * d.scale)?;
            fits("update", &delta)?;
            (t.to_dtype(DType::F32)? + delta)?
        } else if let Some(b) = self.biases.get(name) {
            fits("bias", b)?;
            b.clone()
        } else {
            return Ok(None);
        };
        self.used()?.insert(name.to_string());
        Ok(Some(merged))
    }

    /// The names merged so far.
    fn used(&self) -> Result<std::sync::MutexGuard<'_, BTreeSet<String>>> {
        self.used
            .lock()
            .map_err(|_| Error::Internal("LoRA bookkeeping poisoned".into()))
    }

    /// Fails naming the tensors the adapter changes that loading never read (a module the model
    /// does not have: the adapter belongs to another architecture).
    pub fn check_all_merged(&self) -> Result<()> {
        let used = self.used()?;
        let missing: Vec<&String> = self
            .deltas
            .keys()
            .chain(self.biases.keys())
            .filter(|k| !used.contains(*k))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut missing: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        missing.sort();
        Err(Error::checkpoint(
            &self.dir,
            format!(
                "the adapter targets tensors this model does not have: {}",
                missing.join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{pattern, pattern_matches};
    use std::collections::HashMap;

    #[test]
    fn patterns_match_whole_trailing_names() {
        // peft: re.match(rf"(.*\.)?{key}$", module)
        let m = "transformer.encoder.layers.0.self_attention.dense";
        assert!(pattern_matches("dense", m));
        assert!(pattern_matches("self_attention.dense", m));
        assert!(pattern_matches(m, m));
        assert!(!pattern_matches(
            "dense",
            "transformer.encoder.layers.0.mlp.dense_h_to_4h"
        ));
        assert!(!pattern_matches("ense", m));
    }

    #[test]
    fn the_most_specific_pattern_decides() {
        let m = "transformer.encoder.layers.0.self_attention.dense";
        let p: HashMap<String, usize> =
            [("dense", 2), ("self_attention.dense", 8), ("mlp.dense", 4)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
        assert_eq!(pattern(&p, m), Some(8));
        assert_eq!(
            pattern(&p, "transformer.encoder.layers.0.mlp.dense_h_to_4h"),
            None
        );
    }
}
