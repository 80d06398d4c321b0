//! The ChatGLM2 transformer (ChatGLM3 shares it), read top to bottom: rotary embedding, then
//! the layers bottom-up (RMSNorm, attention, MLP, block), then the model and its `forward`.
//! Names mirror the checkpoint keys (`transformer.encoder.layers.N.self_attention...`).

use super::kv_cache::Cache;
use super::kv_pool::KvPool;
use super::linear::Linear;
use super::lora::{self, StepLora, Target};
use crate::config::Glm2Config;
use crate::error::{Error, Result};
use crate::tuning::Tuning;
use candle_core::{DType, Device, Module, Tensor};
use std::sync::Arc;

/// LoRA adapters served unmerged: loading them beside the weights, and a model's view that
/// runs its sequences with one.
mod adapters;
/// The CUDA decode beside this reference forward: fused decode attention, flash prefill glue,
/// residual adds fused into RMSNorm, and the CUDA graph of a decoding step.
#[cfg(feature = "cuda")]
mod gpu;
/// The model's KV cache pool, its P-Tuning prefix held in the pool, and new caches (with the
/// prefix cache's lookup).
mod kv;
/// Reading each layer from a checkpoint (weight names as the checkpoint keys), and writing them
/// back out for a GGUF file.
mod load;
/// A step's inputs checked and run: batches of sequences, chunked prompts, the CUDA graph step.
mod run;

/// Longest query block whose attention scores are materialised at once during prefill.
const ATTENTION_SCORE_BUDGET: usize = 64 << 20; // f32 elements per block

// ---------------------------------------------------------------------------------------------
// Rotary embedding: applied to the first half of each head, interleaved (x0, x1) pairs.

#[derive(Debug, Clone)]
struct RotaryEmbedding {
    /// `[seq_length, rotary_dim / 2]`, computed in f32 and rounded to the model dtype as the
    /// official code does ("to mimic complex32").
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    fn new(cfg: &Glm2Config, dtype: DType, device: &Device) -> Result<Self> {
        // official: RotaryEmbedding(rotary_dim // 2) with n_elem = kv_channels / 2
        let n_elem = cfg.rotary_dim();
        let half = n_elem / 2;
        // rope_ratio: ChatGLM3 (-32k, -128k) scales the base, ChatGLM2 (-32k) the positions
        let (base, pos_scale) = if cfg.rope_scales_base {
            (10000f32 * cfg.rope_ratio as f32, 1.0f32)
        } else {
            (10000f32, cfg.rope_ratio as f32)
        };
        let theta: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / n_elem as f32))
            .collect();
        let len = cfg.seq_length;
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in 0..len {
            let pos = p as f32 / pos_scale;
            for &t in &theta {
                let a = pos * t;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    /// `x`: `[b, heads, t, kv_channels]` -> same, with positions `start..start + t` rotated.
    fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (_b, _h, t, d) = x.dims4()?;
        let rot = self.cos.dim(1)? * 2;
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        let x_rot = x.narrow(3, 0, rot)?.contiguous()?;
        let x_rot = candle_nn::rotary_emb::rope_i(&x_rot, &cos, &sin)?;
        if rot == d {
            return Ok(x_rot);
        }
        let x_pass = x.narrow(3, rot, d - rot)?;
        Ok(Tensor::cat(&[&x_rot, &x_pass], 3)?)
    }
}

/// Copy `x` to device `d` (a model split over several GPUs) through host memory: the copy back
/// waits for the work that produced `x`, the copy up is ordered before `d`'s next work. A direct
/// device-to-device copy (candle's `to_device`, a peer copy between the two GPUs' memory pools, each
/// side synchronized) gave wrong results now and then on two H200s: a test process that steps
/// split sequences together mismatched one at a time generation in 5 of 7 processes that way and
/// in none of the processes copying through the host (docs/benchmarks.md). The hidden states of a
/// decoding step are a few KiB.
fn to_other_device(x: &Tensor, d: &Device) -> Result<Tensor> {
    if x.device().same_device(d) {
        return Ok(x.clone());
    }
    Ok(x.to_device(&Device::Cpu)?.to_device(d)?)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: statistics in f32, result cast back to the model dtype (official RMSNorm.forward).

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

// ---------------------------------------------------------------------------------------------
// Self-attention with multi-query groups: `query_key_value` -> q [heads], k/v [groups].

#[derive(Debug, Clone)]
struct SelfAttention {
    query_key_value: Linear,
    dense: Linear,
    num_heads: usize,
    num_groups: usize,
    head_dim: usize,
}

impl SelfAttention {
    /// `x`: `[1, n, hidden]`, the rows of several sequences one after another: `segments[i]` is
    /// `(first row, rows)` of sequence `i`, whose positions continue `caches[i]` and whose keys and
    /// values are appended to it. The projections run once over all rows; attention runs per
    /// sequence over its own cache.
    /// `table`: the decode attention's table of this layer on the device (a captured CUDA
    /// graph's step; see [`Glm2Model::graph_step`]).
    /// `lora`: the step's adapters (the fused CUDA paths do not apply them; a step with
    /// adapters takes the path below).
    /// `last_only`: every row's key and value go into the caches, but only the last row of
    /// each segment is attended and comes out (`[1, segments, hidden]`): the last layer of a
    /// step that wants only the last logits ([`Logits::Last`]).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        rotary: &RotaryEmbedding,
        segments: &[(usize, usize)],
        caches: &mut [&mut Cache],
        layer: usize,
        table: Option<&Tensor>,
        tuning: &Tuning,
        lora: Option<&StepLora>,
        last_only: bool,
    ) -> Result<Tensor> {
        let (nh, ng, hd) = (self.num_heads, self.num_groups, self.head_dim);
        #[cfg(feature = "cuda")]
        let fused = tuning.fused && lora.is_none();
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && fused && segments.iter().all(|&(_, t)| t == 1) {
            if let Some(out) =
                self.forward_decode_cuda(x, rotary, caches, layer, table, tuning.split_decode)?
            {
                return Ok(out);
            }
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda()
            && fused
            && tuning.flash
            && caches.iter().all(|c| self.prefill_paged_applies(x, c))
        {
            // projections without their bias; bias, rotary and the cache writes in one kernel
            let (qkv, bias) = self.query_key_value.forward_no_bias(x)?;
            let qkv = qkv.squeeze(0)?; // [n, (nh + 2 ng) hd]
            let mut ctxs = Vec::with_capacity(segments.len());
            for (&(off, t), cache) in segments.iter().zip(caches.iter_mut()) {
                let rows = qkv.narrow(0, off, t)?;
                match self.prefill_paged_cuda(
                    &rows,
                    bias.as_ref(),
                    rotary,
                    cache,
                    layer,
                    tuning,
                    last_only,
                )? {
                    Some(ctx) => ctxs.push(ctx),
                    None => {
                        return Err(Error::Internal(format!(
                            "flash prefill refused {t} tokens of {nh} heads in {ng} groups"
                        )))
                    }
                }
            }
            let ctx = if ctxs.len() == 1 {
                ctxs.pop().expect("one segment")
            } else {
                Tensor::cat(&ctxs, 1)?
            };
            return self.dense.forward(&ctx).map_err(Error::from);
        }
        let qkv = self.query_key_value.forward(x)?; // [1, n, (nh + 2 ng) hd]
        let qkv = lora::add(lora, layer, Target::QueryKeyValue, x, qkv)?;
        let mut ctxs = Vec::with_capacity(segments.len());
        for (&(off, t), cache) in segments.iter().zip(caches.iter_mut()) {
            let qkv = qkv.narrow(1, off, t)?;
            let q = qkv
                .narrow(2, 0, nh * hd)?
                .reshape((1, t, nh, hd))?
                .transpose(1, 2)?; // [1, nh, t, hd]
            let k = qkv
                .narrow(2, nh * hd, ng * hd)?
                .reshape((1, t, ng, hd))?
                .transpose(1, 2)?; // [1, ng, t, hd]
            let v = qkv
                .narrow(2, (nh + ng) * hd, ng * hd)?
                .reshape((1, t, ng, hd))?
                .transpose(1, 2)?;
            let start = cache.position();
            let q = rotary.apply(&q, start)?;
            let k = rotary.apply(&k, start)?;
            cache.write(layer, &k, &v)?;
            // the last query alone: attention of the last `tq` positions
            let (q, tq) = if last_only && t > 1 {
                (q.narrow(2, t - 1, 1)?, 1)
            } else {
                (q, t)
            };
            if t == 1 && x.device().is_cpu() {
                // one token on the CPU: attention read in place from the paged cache
                let qf: Vec<f32> = q.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                let scale = 1.0 / (hd as f32).sqrt();
                if let Some(out) = cache.cpu_decode(layer, cache.len() + 1, &qf, nh, scale)? {
                    let out = Tensor::from_vec(out, (1, 1, nh * hd), x.device())?;
                    ctxs.push(out.to_dtype(q.dtype())?);
                    continue;
                }
            }
            let (k_all, v_all) = cache.gather(layer, cache.len() + t)?; // [1, ng, L, hd]
            let ctx = self.attend(&q, &k_all, &v_all, tuning)?; // [1, nh, tq, hd]
            ctxs.push(ctx.transpose(1, 2)?.reshape((1, tq, nh * hd))?);
        }
        let ctx = if ctxs.len() == 1 {
            ctxs.pop().expect("one segment")
        } else {
            Tensor::cat(&ctxs, 1)?
        };
        let out = self.dense.forward(&ctx)?;
        lora::add(lora, layer, Target::Dense, &ctx, out)
    }

    /// Causal attention of `q` `[b, nh, t, hd]` (the last `t` positions) over `k`, `v`
    /// `[b, ng, L, hd]`, in f32. Heads of one group share its keys without copying them out:
    /// queries are viewed as `[b, ng, (nh/ng) * t, hd]`.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, tuning: &Tuning) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() && tuning.fused {
            return self.attend_cuda(q, k, v, tuning.flash);
        }
        let (b, nh, t, hd) = q.dims4()?;
        let ng = self.num_groups;
        let r = nh / ng;
        let l = k.dim(2)?;
        let past = l - t;
        let dtype = q.dtype();
        let k = k.to_dtype(DType::F32)?.contiguous()?;
        let v = v.to_dtype(DType::F32)?.contiguous()?;
        let kt = k.t()?; // [b, ng, hd, L]
        let scale = 1.0 / (hd as f64).sqrt();
        // Split the queries into blocks so that the score matrix stays bounded.
        let block = (ATTENTION_SCORE_BUDGET / (b * nh * l).max(1)).clamp(1, t.max(1));
        let mut outs = Vec::with_capacity(t.div_ceil(block));
        let mut i0 = 0;
        while i0 < t {
            let tc = block.min(t - i0);
            let visible = past + i0 + tc; // causal: later keys are never needed
            let qc = q
                .narrow(2, i0, tc)?
                .to_dtype(DType::F32)?
                .contiguous()?
                .reshape((b, ng, r * tc, hd))?;
            let kc = kt.narrow(3, 0, visible)?;
            let vc = v.narrow(2, 0, visible)?;
            let mut scores = (qc.matmul(&kc)? * scale)?; // [b, ng, r*tc, visible]
            if tc > 1 {
                let dev = q.device();
                // [tc, visible]: -inf where the key comes after the query
                let mask = if dev.is_cpu() {
                    let mut mask = vec![0f32; tc * visible];
                    for i in 0..tc {
                        for c in (past + i0 + i + 1)..visible {
                            mask[i * visible + c] = f32::NEG_INFINITY;
                        }
                    }
                    Tensor::from_vec(mask, (tc, visible), dev)?
                } else {
                    // built on the device, not uploaded
                    let first = (past + i0) as u32;
                    let qpos = Tensor::arange(first, first + tc as u32, dev)?.reshape((tc, 1))?;
                    let kpos = Tensor::arange(0u32, visible as u32, dev)?.reshape((1, visible))?;
                    let later = kpos.broadcast_gt(&qpos)?;
                    let ninf = Tensor::full(f32::NEG_INFINITY, (tc, visible), dev)?;
                    let zero = Tensor::zeros((tc, visible), DType::F32, dev)?;
                    later.where_cond(&ninf, &zero)?
                };
                scores = scores
                    .reshape((b, ng, r, tc, visible))?
                    .broadcast_add(&mask)?
                    .reshape((b, ng, r * tc, visible))?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let out = probs.matmul(&vc)?; // [b, ng, r*tc, hd]
            outs.push(out.reshape((b, nh, tc, hd))?);
            i0 += tc;
        }
        let out = if outs.len() == 1 {
            outs.pop().expect("one block")
        } else {
            Tensor::cat(&outs, 2)?
        };
        Ok(out.to_dtype(dtype)?)
    }
}

// ---------------------------------------------------------------------------------------------
// MLP: dense_h_to_4h -> SwiGLU -> dense_4h_to_h.

#[derive(Debug, Clone)]
struct Mlp {
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
}

impl Mlp {
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn forward(
        &self,
        x: &Tensor,
        tuning: &Tuning,
        layer: usize,
        lora: Option<&StepLora>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && tuning.fused && lora.is_none() {
            return self.forward_cuda(x);
        }
        let h = self.dense_h_to_4h.forward(x)?;
        let h = lora::add(lora, layer, Target::DenseHTo4h, x, h)?;
        let h = candle_nn::ops::swiglu(&h)?;
        let out = self.dense_4h_to_h.forward(&h)?;
        lora::add(lora, layer, Target::Dense4hToH, &h, out)
    }
}

// ---------------------------------------------------------------------------------------------
// One transformer block (GLMBlock).

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    self_attention: SelfAttention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    residual_post_layernorm: bool,
}

impl Block {
    /// `last_only`: see [`SelfAttention::forward`]; the output is then the last row of each
    /// segment.
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        rotary: &RotaryEmbedding,
        segments: &[(usize, usize)],
        caches: &mut [&mut Cache],
        layer: usize,
        tuning: &Tuning,
        lora: Option<&StepLora>,
        last_only: bool,
    ) -> Result<Tensor> {
        let ln = self.input_layernorm.forward(x)?;
        let attn = self.self_attention.forward(
            &ln, rotary, segments, caches, layer, None, tuning, lora, last_only,
        )?;
        let (x, ln) = if last_only {
            (last_rows(x, segments)?, last_rows(&ln, segments)?)
        } else {
            (x.clone(), ln)
        };
        let residual = if self.residual_post_layernorm {
            &ln
        } else {
            &x
        };
        let ln_input = (residual + attn)?;
        let ln2 = self.post_attention_layernorm.forward(&ln_input)?;
        let mlp = self.mlp.forward(&ln2, tuning, layer, lora)?;
        let residual = if self.residual_post_layernorm {
            &ln2
        } else {
            &ln_input
        };
        Ok((residual + mlp)?)
    }
}

/// The last row of each segment (`(first row, rows)`) of `x` `[1, n, hidden]`:
/// `[1, segments, hidden]` (`x` itself when every segment is one row).
fn last_rows(x: &Tensor, segments: &[(usize, usize)]) -> Result<Tensor> {
    if segments.iter().all(|&(_, t)| t == 1) {
        return Ok(x.clone());
    }
    Ok(match segments {
        [(o, t)] => x.narrow(1, o + t - 1, 1)?,
        _ => {
            let last: Vec<u32> = segments.iter().map(|&(o, t)| (o + t - 1) as u32).collect();
            let last = Tensor::from_vec(last, segments.len(), x.device())?;
            x.index_select(&last, 1)?
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The model.

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every input position: `[b, t, vocab]`.
    All,
    /// Only the last position: `[b, 1, vocab]` (generation; saves the output projection).
    Last,
}

/// A loaded ChatGLM2 model: weights only, immutable, shareable across threads (`Arc`).
/// Every call brings its own [`Cache`]. A clone shares the weights (tensors are reference
/// counted).
#[derive(Debug, Clone)]
pub struct Glm2Model {
    /// The paged KV cache's blocks, shared by every sequence of this model (and its clones).
    kv: Arc<KvPool>,
    config: Glm2Config,
    dtype: DType,
    device: Device,
    word_embeddings: Tensor,
    /// Per layer: the rotary tables on that layer's device.
    rotary: Vec<RotaryEmbedding>,
    layers: Vec<Block>,
    /// Per layer: where its weights and its part of every cache live (several GPUs: a split
    /// of the layers, as the official `load_model_on_gpus`).
    layer_devices: Vec<Device>,
    final_layernorm: Option<RmsNorm>,
    output_layer: Linear,
    prefix: Option<super::prefix::Prefix>,
    /// The prefix's keys and values held in the pool (every new cache starts with these blocks).
    prefix_blocks: Option<Arc<kv::PrefixBlocks>>,
    /// Where the prefix cache's keys start for this model's caches: new for every pool and
    /// prefix, so blocks of another prefix are never found.
    kv_salt: u64,
    /// The switches this model was loaded with; the step-time ones (`fused`, `flash`,
    /// `cuda_graph`) are read from here at each step.
    tuning: Tuning,
    /// LoRA adapters loaded beside the weights, by name ([`Glm2Model::add_adapter`]).
    adapters: Arc<Vec<Arc<super::UnmergedLora>>>,
    /// The adapter this view's new caches run with ([`Glm2Model::with_adapter`]).
    adapter: Option<Arc<super::UnmergedLora>>,
}

/// Loading progress: `(tensors done, tensors in all)`.
pub type ProgressFn<'a> = &'a dyn Fn(usize, usize);

impl Glm2Model {
    /// The same weights (shared, not copied) with other step-time switches
    /// ([`Tuning::fused`], [`Tuning::flash`], [`Tuning::cuda_graph`]); the load-time ones stay
    /// as loaded (see [`crate::tuning`]).
    pub fn with_tuning(&self, tuning: Tuning) -> Self {
        Self {
            tuning,
            ..self.clone()
        }
    }

    /// The switches this model runs with.
    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }

    /// How many distinct devices hold the layers.
    pub fn num_devices(&self) -> usize {
        let ds = &self.layer_devices;
        (0..ds.len())
            .filter(|&i| !ds[..i].iter().any(|e| e.same_device(&ds[i])))
            .count()
    }

    /// The devices holding the layers, in layer order (several for a multi-GPU split).
    pub fn layer_devices(&self) -> &[Device] {
        &self.layer_devices
    }

    /// Length of the P-Tuning prefix (0 without one).
    pub fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, |p| p.len)
    }

    pub fn config(&self) -> &Glm2Config {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The most positions a sequence can have (`seq_length`; a P-Tuning prefix comes on top).
    pub fn max_context(&self) -> usize {
        self.config.seq_length
    }

    /// Run `input_ids` (`[1, t]`, u32) after what `cache` holds, append their keys and values to
    /// it, and return f32 logits (`[1, t, vocab]` or `[1, 1, vocab]`).
    pub fn forward(&self, input_ids: &Tensor, cache: &mut Cache, which: Logits) -> Result<Tensor> {
        let (b, _t) = input_ids.dims2()?;
        if b != 1 {
            return Err(Error::invalid(format!(
                "forward takes one sequence ([1, t] ids, got batch {b}); use forward_many for several"
            )));
        }
        let ids: Vec<u32> = input_ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
        let mut out = self.forward_many(&[&ids], &mut [cache], which)?;
        Ok(out.pop().expect("one sequence").unsqueeze(0)?)
    }

    /// Run several sequences in one pass: `inputs[i]` continues `caches[i]` (any lengths: a
    /// prompt next to single decode tokens). Every weight is read once for all of them; each
    /// sequence attends only to its own cache, so the result of each equals running it alone.
    /// Returns f32 logits per sequence: `[t_i, vocab]` (`Logits::All`) or `[1, vocab]` (`Last`).
    pub fn forward_many(
        &self,
        inputs: &[&[u32]],
        caches: &mut [&mut Cache],
        which: Logits,
    ) -> Result<Vec<Tensor>> {
        let (logits, segments) = self.run(inputs, caches, which)?;
        let mut out = Vec::with_capacity(segments.len());
        let mut row = 0;
        for &(_, t) in &segments {
            let rows = if which == Logits::Last { 1 } else { t };
            out.push(logits.narrow(0, row, rows)?);
            row += rows;
        }
        Ok(out)
    }

    /// [`Glm2Model::forward_many`] with `Logits::Last`, as one f32 tensor `[sequences, vocab]`
    /// (still on the model's device).
    pub fn forward_last(&self, inputs: &[&[u32]], caches: &mut [&mut Cache]) -> Result<Tensor> {
        Ok(self.run(inputs, caches, Logits::Last)?.0)
    }

    /// The forward pass of `input` (`[1, n]` ids on the model's device, `segments` as in
    /// [`SelfAttention::forward`]) without advancing the caches: f32 logits `[rows, vocab]`.
    /// `table`: every layer's decode attention table on the device, one after another
    /// ([`Glm2Model::graph_step`]).
    #[cfg_attr(not(feature = "cuda"), allow(unused_assignments, unused_variables))]
    fn forward_ids(
        &self,
        input: &Tensor,
        segments: &[(usize, usize)],
        caches: &mut [&mut Cache],
        which: Logits,
        table: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut x = self.embed(input)?; // [1, n, hidden]
        let lora = StepLora::of(caches, segments, input.device())?;
        #[cfg(feature = "cuda")]
        let fused = self.device.is_cuda()
            && self.tuning.fused
            && lora.is_none()
            && !self.config.apply_residual_connection_post_layernorm;
        #[cfg(not(feature = "cuda"))]
        let fused = false;
        // Only the last logits: the last layer writes every row's key and value but computes
        // the rest (attention, dense, MLP) for the last row of each segment alone, the only
        // rows the output reads (a 32K prompt: 1/28 of chatglm2-6b's work). Not with adapters
        // (their rows follow the segments).
        let last_only = which == Logits::Last && lora.is_none() && !self.layers.is_empty();
        let last = self.layers.len().saturating_sub(1);
        if fused {
            #[cfg(feature = "cuda")]
            {
                x = self.layers_fused(x, segments, caches, table, last_only)?;
            }
        } else {
            for (i, layer) in self.layers.iter().enumerate() {
                x = to_other_device(&x, &self.layer_devices[i])?;
                x = layer.forward(
                    &x,
                    &self.rotary[i],
                    segments,
                    caches,
                    i,
                    &self.tuning,
                    lora.as_ref(),
                    last_only && i == last,
                )?;
            }
        }
        if which == Logits::Last && !last_only {
            x = last_rows(&x, segments)?;
        }
        if let Some(norm) = &self.final_layernorm {
            x = norm.forward(&x)?;
        }
        Ok(self
            .output_layer
            .forward(&x)?
            .to_dtype(DType::F32)?
            .squeeze(0)?)
    }

    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?;
        let x = self.word_embeddings.index_select(&flat, 0)?;
        Ok(x.reshape((b, t, self.config.hidden_size))?)
    }
}
