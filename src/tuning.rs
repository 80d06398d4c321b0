//! Tuning switches: every knob of the engine that changes how (never what) it computes, in one
//! typed struct. This is the one place they are documented and the one place the environment is
//! read ([`Tuning::from_env`], once per process, through [`Tuning::env`]). Everything below takes
//! a `Tuning` (or the one field it needs) as an argument: a model keeps the `Tuning` it was loaded
//! with (`LoadOptions::tuning`), its layers keep the kernel choices made at load, and
//! [`crate::pipeline::Model::with_tuning`] gives a model sharing the same weights with other step-time
//! switches (what the GPU benchmarks use to compare both settings in one process).
//!
//! Environment variables are only a way to set them. Every boolean variable has the same
//! meaning of on and off: `1`, `true`, `on`, `yes` switch it on; `0`, `false`, `off`, `no` switch
//! it off; unset keeps the default; any other value keeps the default with a warning on stderr.
//!
//! | field | variable | default | effect |
//! | --- | --- | --- | --- |
//! | `fused` | `GLM2RS_FUSED` | on | CUDA: glm2rs's fused decode kernels; off: candle's own ops |
//! | `flash` | `GLM2RS_FLASH` | on | CUDA: 16-bit prompts attend in one flash kernel per layer; off: cuBLAS score blocks |
//! | `cuda_graph` | `GLM2RS_CUDA_GRAPH` | on | CUDA: one sequence's decode step replays a captured graph |
//! | `wgmma` | `GLM2RS_WGMMA` | on | CUDA, compute capability 9.0 (H100/H200), head_dim 128: prompts attend in the flash kernel on Hopper's warpgroup matrix instructions; off: the mma.sync flash kernel of other GPUs |
//! | `split_decode` | `GLM2RS_SPLIT_DECODE` | on | CUDA: the fused decode attention splits long sequences over many blocks (flash-decoding), a block per KV group; off: one block per query head |
//! | `prefill_chunk` | `GLM2RS_PREFILL_CHUNK` | 8192 | every device: a prompt longer than this many tokens is prefilled this many per forward pass (chunked prefill: bounded activation memory, and in a batch the other sequences keep decoding meanwhile); 0: in one pass |
//! | `cuda_events` | `GLM2RS_CUDA_EVENTS` | off | CUDA: keep candle's per-allocation events on single-GPU models |
//! | `cuda_pool_release` | `GLM2RS_CUDA_POOL_RELEASE` | off | CUDA: return freed memory to the driver at each synchronization |
//! | `gemvq` | `GLM2RS_GEMVQ` (`float`/`dp4a`) | auto | CUDA: kernel of the int8/int4 GEMV |
//! | `gemvq_rows` | `GLM2RS_GEMVQ_ROWS` | 0 (auto) | CUDA: rows per launch of the batched int8/int4 GEMV |
//! | `dequantize` | `GLM2RS_DEQUANTIZE` | off | CPU: official int8/int4 weights dequantized at load instead of integer kernels |
//! | `vnni` | `GLM2RS_NO_VNNI` (inverted) | on | CPU: AVX-512 VNNI integer kernels for 16-bit quantized models where the CPU has them |
//!
//! Load-time switches (`cuda_events`, `cuda_pool_release`: at device creation; `gemvq`,
//! `gemvq_rows`, `dequantize`, `vnni`: kept by each layer at load) need a reload to change; the
//! step-time ones (`fused`, `flash`, `wgmma`, `cuda_graph`, `split_decode`, `prefill_chunk`) follow [`crate::pipeline::Model::with_tuning`].

use std::sync::OnceLock;

/// Which CUDA kernel runs the official int8/int4 GEMV (see the module table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GemvQ {
    /// Float kernel for one row of a float16 model, integer (dp4a) kernel otherwise.
    #[default]
    Auto,
    /// Always the float kernel.
    Float,
    /// Always the integer (dp4a) kernel.
    Dp4a,
}

/// The engine's tuning switches (see the module documentation for each one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    pub fused: bool,
    pub flash: bool,
    pub wgmma: bool,
    pub cuda_graph: bool,
    pub split_decode: bool,
    /// Tokens of one sequence per forward pass (0: no limit).
    pub prefill_chunk: usize,
    pub cuda_events: bool,
    pub cuda_pool_release: bool,
    pub gemvq: GemvQ,
    /// 0: decided by the kernel.
    pub gemvq_rows: u32,
    pub dequantize: bool,
    pub vnni: bool,
}

impl Default for Tuning {
    /// The defaults, whatever the environment says.
    fn default() -> Self {
        Self {
            fused: true,
            flash: true,
            wgmma: true,
            cuda_graph: true,
            split_decode: true,
            prefill_chunk: 8192,
            cuda_events: false,
            cuda_pool_release: false,
            gemvq: GemvQ::Auto,
            gemvq_rows: 0,
            dequantize: false,
            vnni: true,
        }
    }
}

/// A boolean setting: `Some(true)` / `Some(false)` for the accepted spellings, `None` otherwise.
pub fn parse_switch(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Some(true),
        "0" | "false" | "off" | "no" => Some(false),
        _ => None,
    }
}

impl Tuning {
    /// The defaults with every `GLM2RS_*` variable of `get` applied (`get` is the environment in
    /// [`Tuning::from_env`]; tests pass a map).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Self {
        let mut t = Self::default();
        let warn = |name: &str, v: &str, want: &str| {
            eprintln!("glm2rs: ignoring {name}={v:?} (expected {want})");
        };
        let switch = |name: &str, field: &mut bool, invert: bool| {
            if let Some(v) = get(name) {
                match parse_switch(&v) {
                    Some(on) => *field = on != invert,
                    None => warn(name, &v, "1/true/on/yes or 0/false/off/no"),
                }
            }
        };
        switch("GLM2RS_FUSED", &mut t.fused, false);
        switch("GLM2RS_FLASH", &mut t.flash, false);
        switch("GLM2RS_WGMMA", &mut t.wgmma, false);
        switch("GLM2RS_CUDA_GRAPH", &mut t.cuda_graph, false);
        switch("GLM2RS_SPLIT_DECODE", &mut t.split_decode, false);
        switch("GLM2RS_CUDA_EVENTS", &mut t.cuda_events, false);
        switch("GLM2RS_CUDA_POOL_RELEASE", &mut t.cuda_pool_release, false);
        switch("GLM2RS_DEQUANTIZE", &mut t.dequantize, false);
        switch("GLM2RS_NO_VNNI", &mut t.vnni, true);
        if let Some(v) = get("GLM2RS_GEMVQ") {
            match v.trim().to_ascii_lowercase().as_str() {
                "float" => t.gemvq = GemvQ::Float,
                "dp4a" => t.gemvq = GemvQ::Dp4a,
                "auto" | "" => t.gemvq = GemvQ::Auto,
                _ => warn("GLM2RS_GEMVQ", &v, "float, dp4a or auto"),
            }
        }
        if let Some(v) = get("GLM2RS_PREFILL_CHUNK") {
            match v.trim().parse::<usize>() {
                Ok(n) => t.prefill_chunk = n,
                Err(_) => warn(
                    "GLM2RS_PREFILL_CHUNK",
                    &v,
                    "a number of tokens (0: whole prompts)",
                ),
            }
        }
        if let Some(v) = get("GLM2RS_GEMVQ_ROWS") {
            match v.trim().parse::<u32>() {
                Ok(n) => t.gemvq_rows = n,
                Err(_) => warn("GLM2RS_GEMVQ_ROWS", &v, "a number of rows"),
            }
        }
        t
    }

    /// The defaults with this process's `GLM2RS_*` environment variables applied.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`Tuning::from_env`], read once per process: the default of `LoadOptions::tuning`.
    pub fn env() -> Tuning {
        static ENV: OnceLock<Tuning> = OnceLock::new();
        *ENV.get_or_init(Self::from_env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Tuning {
        let map: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Tuning::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn one_meaning_of_on_and_off() {
        assert_eq!(with(&[]), Tuning::default());
        let t = with(&[
            ("GLM2RS_FUSED", "0"),
            ("GLM2RS_FLASH", "off"),
            ("GLM2RS_WGMMA", "0"),
            ("GLM2RS_CUDA_GRAPH", "False"),
            ("GLM2RS_SPLIT_DECODE", "no"),
            ("GLM2RS_CUDA_EVENTS", "1"),
            ("GLM2RS_CUDA_POOL_RELEASE", "yes"),
            ("GLM2RS_DEQUANTIZE", "on"),
            ("GLM2RS_NO_VNNI", "true"),
            ("GLM2RS_GEMVQ", "dp4a"),
            ("GLM2RS_GEMVQ_ROWS", "16"),
            ("GLM2RS_PREFILL_CHUNK", "512"),
        ]);
        assert_eq!(t.prefill_chunk, 512);
        assert!(!t.fused && !t.flash && !t.wgmma && !t.cuda_graph && !t.split_decode);
        assert!(t.cuda_events && t.cuda_pool_release && t.dequantize && !t.vnni);
        assert_eq!((t.gemvq, t.gemvq_rows), (GemvQ::Dp4a, 16));
        // "0" means off for every variable, so GLM2RS_NO_VNNI=0 keeps VNNI on and
        // GLM2RS_DEQUANTIZE=0 keeps the integer kernels
        let t = with(&[("GLM2RS_NO_VNNI", "0"), ("GLM2RS_DEQUANTIZE", "0")]);
        assert!(t.vnni && !t.dequantize);
    }

    #[test]
    fn unknown_values_keep_the_default() {
        let t = with(&[
            ("GLM2RS_FUSED", "maybe"),
            ("GLM2RS_GEMVQ", "fast"),
            ("GLM2RS_GEMVQ_ROWS", "-3"),
            ("GLM2RS_PREFILL_CHUNK", "lots"),
        ]);
        assert_eq!(t, Tuning::default());
    }
}
