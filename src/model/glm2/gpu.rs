//! The CUDA decode of [`Glm2Model`], beside the reference forward of `glm2.rs`: the decode
//! attention of every sequence of a step in one kernel, prompts through flash attention (or
//! float32 score blocks), SwiGLU fused into the GEMV, residual adds fused into the RMSNorm after
//! them, and the CUDA graph of a single sequence's decoding step. Each function is reached from
//! one `#[cfg(feature = "cuda")]` line of `glm2.rs` when [`Tuning::fused`] is on; the kernels
//! themselves are in `crate::kernels::cuda`.

use super::{Block, Glm2Model, Logits, Mlp, RmsNorm, RotaryEmbedding, SelfAttention};
use crate::error::Result;
use crate::model::kv_cache::Cache;
use crate::tuning::Tuning;
use candle_core::{DType, Module, Tensor};

/// Longest query block whose attention scores are materialised at once during a GPU prefill
/// without flash attention (the CPU's `ATTENTION_SCORE_BUDGET` is larger: memory is scarcer
/// here and smaller blocks cost little time): 64 MiB of float32 scores (256 queries of
/// chatglm2-6b at 2048 tokens).
const GPU_ATTENTION_SCORE_BUDGET: usize = 16 << 20;

/// A cache's CUDA graph state (kept in [`Cache`]'s attached slot; see `Glm2Model::graph_step`).
enum GraphState {
    /// Capturing failed here: decode without graphs.
    Off,
    On {
        bufs: GraphBuffers,
        /// The captured step, with the block table address and the planned length it was
        /// captured for.
        graph: Option<((u64, usize), crate::kernels::cuda::Graph)>,
        /// The eager warm-up step has run.
        warm: bool,
    },
}

/// The fixed device buffers a captured decoding step reads and writes.
struct GraphBuffers {
    /// `[layers * SEQ_INFO_WORDS + 1]` u32: each layer's attention table row, then the input id.
    step: Tensor,
    /// `[1, vocab]` f32: the step's logits.
    logits: Tensor,
    /// The model whose weights the graph reads (its embedding tensor).
    model: candle_core::TensorId,
}

impl SelfAttention {
    /// [`SelfAttention::attend`] on CUDA: scores from float32 (TF32) products, then one kernel
    /// for scale, causal mask and softmax, whose 16-bit probabilities multiply the values in
    /// the model dtype (as fused attention kernels do).
    /// `flash`: [`Tuning::flash`].
    pub(super) fn attend_cuda(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        flash: bool,
    ) -> Result<Tensor> {
        use crate::kernels::cuda::CausalSoftmax;
        let (b, nh, t, hd) = q.dims4()?;
        let scale = 1.0 / (hd as f32).sqrt();
        if flash {
            if let Some(out) = crate::kernels::cuda::flash_prefill(q, k, v, scale)? {
                return Ok(out);
            }
        }
        let ng = self.num_groups;
        let r = nh / ng;
        let l = k.dim(2)?;
        let past = l - t;
        let dtype = q.dtype();
        let kt = k.to_dtype(DType::F32)?.contiguous()?.t()?; // [b, ng, hd, L]
        let v = v.contiguous()?;
        let block = (GPU_ATTENTION_SCORE_BUDGET / (b * nh * l).max(1)).clamp(1, t.max(1));
        let mut outs = Vec::with_capacity(t.div_ceil(block));
        let mut i0 = 0;
        while i0 < t {
            let tc = block.min(t - i0);
            let visible = past + i0 + tc;
            let qc = q
                .narrow(2, i0, tc)?
                .to_dtype(DType::F32)?
                .contiguous()?
                .reshape((b, ng, r * tc, hd))?;
            let scores = qc.matmul(&kt.narrow(3, 0, visible)?)?; // [b, ng, r*tc, visible]
            let probs = scores.apply_op1_no_bwd(&CausalSoftmax {
                tc,
                first_q: past + i0,
                scale,
                dtype,
            })?;
            let out = probs.matmul(&v.narrow(2, 0, visible)?)?; // [b, ng, r*tc, hd]
            outs.push(out.reshape((b, nh, tc, hd))?);
            i0 += tc;
        }
        Ok(if outs.len() == 1 {
            outs.pop().expect("one block")
        } else {
            Tensor::cat(&outs, 2)?
        })
    }

    /// Whether [`SelfAttention::prefill_paged_cuda`] takes this model's prompts: 16-bit, head_dim
    /// 64 or 128, the cache of the model's dtype.
    pub(super) fn prefill_paged_applies(&self, x: &Tensor, cache: &Cache) -> bool {
        matches!(x.dtype(), DType::BF16 | DType::F16)
            && matches!(self.head_dim, 64 | 128)
            && self.num_groups > 0
            && self.num_heads % self.num_groups == 0
            && x.dtype() == cache.pool().dtype()
    }

    /// A prompt (or a chunk of one) of one sequence on CUDA, straight into its paged cache: its
    /// rows of the projection (`qkv` `[t, (heads + 2 groups) head_dim]`, `bias` not yet added)
    /// through one kernel that adds the bias, turns queries and keys and writes keys and values
    /// into the sequence's blocks, then the flash kernel reading every key and value through the
    /// block table (no gathered copy; on Hopper the wgmma kernel where [`Tuning::wgmma`]).
    /// Returns `[1, t, heads * head_dim]` (`last_only`: `[1, 1, heads * head_dim]`, the last
    /// query's, through the decode attention kernel), or `None` where the flash kernel does not
    /// apply.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn prefill_paged_cuda(
        &self,
        qkv: &Tensor,
        bias: Option<&Tensor>,
        rotary: &RotaryEmbedding,
        cache: &mut Cache,
        layer: usize,
        tuning: &Tuning,
        last_only: bool,
    ) -> Result<Option<Tensor>> {
        let (nh, ng, hd) = (self.num_heads, self.num_groups, self.head_dim);
        let seq = cache.decode_seq(layer, qkv.device())?;
        let t = qkv.dim(0)?;
        // last_only: every row but the last through prefill_qkv (keys and values into the cache,
        // their queries unused), the last row as a decoding step, its attention split over the GPU
        let last_only = last_only && t > 1 && hd <= crate::kernels::cuda::MAX_HEAD_DIM;
        let rows = if last_only { t - 1 } else { t };
        let q = crate::kernels::cuda::prefill_qkv(
            &qkv.narrow(0, 0, rows)?,
            bias,
            &rotary.cos,
            &rotary.sin,
            &seq,
            nh,
            ng,
            hd,
        )?;
        if last_only {
            let mut last = seq;
            last.len += rows;
            last.rot += rows;
            last.reach = last.reach.max((last.len + 1).next_power_of_two());
            let op = crate::kernels::cuda::DecodeAttention {
                seqs: std::slice::from_ref(&last),
                table: None,
                bias,
                cos: &rotary.cos,
                sin: &rotary.sin,
                heads: nh,
                groups: ng,
                head_dim: hd,
                split: tuning.split_decode,
            };
            let ctx = qkv.narrow(0, rows, 1)?.apply_op1_no_bwd(&op)?; // [1, nh hd]
            return Ok(Some(ctx.reshape((1, 1, nh * hd))?));
        }
        let scale = 1.0 / (hd as f32).sqrt();
        crate::kernels::cuda::flash_prefill_paged(&q, &seq, ng, scale, tuning.wgmma)
            .map_err(Into::into)
    }

    /// One decoding step of every sequence (one new token each) in one fused kernel: bias,
    /// rotary, cache write and attention over each sequence's own cache. `None` for heads the
    /// kernel does not take (the caller runs the reference path).
    pub(super) fn forward_decode_cuda(
        &self,
        x: &Tensor,
        rotary: &RotaryEmbedding,
        caches: &mut [&mut Cache],
        layer: usize,
        table: Option<&Tensor>,
        split: bool,
    ) -> Result<Option<Tensor>> {
        use crate::kernels::cuda::DecodeAttention;
        let (nh, ng, hd) = (self.num_heads, self.num_groups, self.head_dim);
        if hd > crate::kernels::cuda::MAX_HEAD_DIM {
            return Ok(None);
        }
        let (_, n, _) = x.dims3()?;
        let (qkv, bias) = self.query_key_value.forward_no_bias(x)?; // [1, n, (nh + 2 ng) hd]
        let qkv = qkv.reshape((n, (nh + 2 * ng) * hd))?;
        let mut seqs = Vec::with_capacity(n);
        for cache in caches.iter_mut() {
            seqs.push(cache.decode_seq(layer, qkv.device())?);
        }
        let op = DecodeAttention {
            seqs: &seqs,
            table,
            bias: bias.as_ref(),
            cos: &rotary.cos,
            sin: &rotary.sin,
            heads: nh,
            groups: ng,
            head_dim: hd,
            split,
        };
        let ctx = qkv.apply_op1_no_bwd(&op)?; // [n, nh hd]
        Ok(Some(self.dense.forward(&ctx.reshape((
            1,
            n,
            nh * hd,
        ))?)?))
    }
}

impl Mlp {
    /// One token: the product and SwiGLU in one launch; more rows: the product, then the SwiGLU
    /// kernel.
    pub(super) fn forward_cuda(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(h) = self.dense_h_to_4h.forward_swiglu_cuda(x)? {
            return Ok(self.dense_4h_to_h.forward(&h)?);
        }
        let h = self.dense_h_to_4h.forward(x)?;
        let h = h
            .contiguous()?
            .apply_op1_no_bwd(&crate::kernels::cuda::SwiGlu)?;
        Ok(self.dense_4h_to_h.forward(&h)?)
    }
}

impl Block {
    /// [`Block::forward`] with each residual add fused into the RMSNorm after it (CUDA; not for
    /// `apply_residual_connection_post_layernorm`). `normed` is this block's input norm when
    /// the previous block computed it; with `next_norm` the output comes with the next block's
    /// input norm. `last_only`: see [`SelfAttention::forward`] (the output is the last row of
    /// each segment).
    #[allow(clippy::too_many_arguments)]
    fn forward_fused(
        &self,
        x: &Tensor,
        normed: Option<Tensor>,
        next_norm: Option<&RmsNorm>,
        rotary: &RotaryEmbedding,
        segments: &[(usize, usize)],
        caches: &mut [&mut Cache],
        layer: usize,
        table: Option<&Tensor>,
        tuning: &Tuning,
        last_only: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        use crate::kernels::cuda::add_rmsnorm;
        let ln = match normed {
            Some(n) => n,
            None => {
                add_rmsnorm(
                    x,
                    None,
                    &self.input_layernorm.weight,
                    self.input_layernorm.eps,
                )?
                .1
            }
        };
        let attn = self.self_attention.forward(
            &ln, rotary, segments, caches, layer, table, tuning, None, last_only,
        )?;
        let x = if last_only {
            &super::last_rows(x, segments)?
        } else {
            x
        };
        let (h, ln2) = add_rmsnorm(
            x,
            Some(&attn),
            &self.post_attention_layernorm.weight,
            self.post_attention_layernorm.eps,
        )?;
        let mlp = self.mlp.forward_cuda(&ln2)?;
        Ok(match next_norm {
            Some(n) => {
                let (out, normed) = add_rmsnorm(&h, Some(&mlp), &n.weight, n.eps)?;
                (out, Some(normed))
            }
            None => ((h + mlp)?, None),
        })
    }
}

impl Glm2Model {
    /// Every block over `x`, each residual add fused into the RMSNorm after it; the next block's
    /// input norm is fused in when it lives on the same device. `table`: every layer's decode
    /// attention table on the device, one after another ([`Glm2Model::graph_step`]).
    /// `last_only`: the last block computes only the last row of each segment past its keys
    /// and values ([`SelfAttention::forward`]).
    pub(super) fn layers_fused(
        &self,
        mut x: Tensor,
        segments: &[(usize, usize)],
        caches: &mut [&mut Cache],
        table: Option<&Tensor>,
        last_only: bool,
    ) -> Result<Tensor> {
        use crate::kernels::cuda::SEQ_INFO_WORDS;
        let mut normed: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let d = &self.layer_devices[i];
            if !x.device().same_device(d) {
                x = super::to_other_device(&x, d)?;
                normed = None;
            }
            let next = self
                .layers
                .get(i + 1)
                .filter(|_| self.layer_devices[i + 1].same_device(d))
                .map(|b| &b.input_layernorm);
            let table = table
                .map(|t| t.narrow(0, i * SEQ_INFO_WORDS, SEQ_INFO_WORDS))
                .transpose()?;
            let (out, n) = layer.forward_fused(
                &x,
                normed.take(),
                next,
                &self.rotary[i],
                segments,
                caches,
                i,
                table.as_ref(),
                &self.tuning,
                last_only && i + 1 == self.layers.len(),
            )?;
            x = out;
            normed = n;
        }
        Ok(x)
    }
}

impl Glm2Model {
    /// One decoding step of one sequence (`id` after what `cache` holds) as a replay of a CUDA
    /// graph: the step's ~200 launches cost one. The graph belongs to the cache (it points into
    /// its buffers and is kept in it); each step writes the attention tables (lengths, rotary
    /// position) and the id into a device buffer the graph reads. The first step runs the same
    /// work eagerly (loading kernels, caching candle's parameter copies); the next is captured;
    /// a cache that grows (new buffers) is captured again. `None`: not applicable here, or the
    /// capture failed (then the cache decodes without graphs); the caller runs the step.
    /// `Tuning::cuda_graph` off turns graphs off. The numbers are those of the eager step: the
    /// same kernels on the same data.
    pub(super) fn graph_step(&self, id: u32, cache: &mut Cache) -> Result<Option<Tensor>> {
        use crate::kernels::cuda::{self as kc, Graph, SEQ_INFO_WORDS};
        let hd = self.config.kv_channels;
        if !self.tuning.cuda_graph
            || cache.is_empty()
            || !self.device.is_cuda()
            || !self.tuning.fused
            || self.config.apply_residual_connection_post_layernorm
            || hd > kc::MAX_HEAD_DIM
            || self.num_devices() > 1
        {
            return Ok(None);
        }
        let model = self.word_embeddings.id();
        let state = cache
            .attached
            .0
            .take()
            .and_then(|b| b.downcast::<GraphState>().ok())
            .map(|b| *b);
        let (bufs, graph, warm) = match state {
            Some(GraphState::Off) => {
                cache.attached.0 = Some(Box::new(GraphState::Off));
                return Ok(None);
            }
            Some(GraphState::On { bufs, graph, warm }) if bufs.model == model => {
                (bufs, graph, warm)
            }
            _ => {
                let words = self.layers.len() * SEQ_INFO_WORDS + 1;
                let bufs = GraphBuffers {
                    step: Tensor::zeros(words, DType::U32, &self.device)?,
                    logits: Tensor::zeros(
                        (1, self.config.padded_vocab_size),
                        DType::F32,
                        &self.device,
                    )?,
                    model,
                };
                (bufs, None, false)
            }
        };
        // this token's block is reserved (`run`) and the block table written to the device
        // outside any capture; the graph reads the table, the pool's slab tables and the step
        // buffer, all at fixed addresses: it is captured again only when the split kernels'
        // shape changes (the sequence passes a power of two)
        let mut words = Vec::with_capacity(self.layers.len() * SEQ_INFO_WORDS + 1);
        let mut key = None;
        for i in 0..self.layers.len() {
            let seq = cache.decode_seq(i, &self.device)?;
            key.get_or_insert((seq.blocks, seq.reach));
            words.extend(kc::seq_info_words(&seq, 0)?);
        }
        let key = key.unwrap_or_default();
        words.push(id);
        kc::write_u32(&bufs.step, &words)?;
        let body = |cache: &mut Cache| -> Result<()> {
            let ids = bufs
                .step
                .narrow(0, self.layers.len() * SEQ_INFO_WORDS, 1)?
                .reshape((1, 1))?;
            let logits = self.forward_ids(
                &ids,
                &[(0, 1)],
                &mut [cache],
                Logits::Last,
                Some(&bufs.step),
            )?;
            bufs.logits.slice_set(&logits, 0, 0)?;
            Ok(())
        };
        let (graph, warm) = match graph {
            Some((k, g)) if k == key => {
                g.launch()?;
                (Some((k, g)), warm)
            }
            _ if !warm => {
                let _cached = kc::htod_cache(&self.device);
                body(cache)?;
                (None, true)
            }
            _ => match Graph::capture(&self.device, || body(cache)) {
                Ok(g) => {
                    g.launch()?;
                    (Some((key, g)), true)
                }
                Err(e) => {
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| {
                        eprintln!(
                            "glm2rs: CUDA graph capture failed ({e}); decoding without graphs"
                        )
                    });
                    cache.attached.0 = Some(Box::new(GraphState::Off));
                    return Ok(None);
                }
            },
        };
        cache.advance_tokens(&[id]);
        let logits = bufs.logits.copy()?;
        cache.attached.0 = Some(Box::new(GraphState::On { bufs, graph, warm }));
        Ok(Some(logits))
    }
}
