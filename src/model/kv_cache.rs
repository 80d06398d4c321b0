//! The KV cache of one sequence (or one batch of equally long sequences).
//! It belongs to the caller, never to the model, so many sequences can share one model.

use candle_core::{DType, Device, Result, Tensor};

/// Room is added in steps of this many positions (and at least doubled), so appending a token
/// never copies the whole cache: growth is amortised O(1) per token.
const GROW_STEP: usize = 256;

/// One layer's keys and values: `[batch, groups, capacity, kv_channels]`, the first `len` valid.
#[derive(Debug, Clone)]
pub struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// State a backend ties to a cache's buffers (the captured CUDA graph of its decoding step,
/// which points into them): a clone starts without it, [`Cache::clear`] drops it.
#[derive(Default)]
pub(crate) struct Attached(pub(crate) Option<Box<dyn std::any::Any + Send + Sync>>);

impl Clone for Attached {
    fn clone(&self) -> Self {
        Self(None)
    }
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Attached(..)"
        } else {
            "Attached(None)"
        })
    }
}

/// The cache of every layer, plus the number of positions it holds.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<Option<LayerCache>>,
    /// Valid entries (prefix entries included).
    len: usize,
    /// Rotary position of the next token: `len` minus the P-Tuning prefix length.
    position: usize,
    /// Largest number of entries ever allowed (the model's context).
    max_len: usize,
    /// Element type of the stored keys and values (`None`: as appended).
    dtype: Option<DType>,
    /// Backend state tied to the buffers above.
    pub(crate) attached: Attached,
}

impl Cache {
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
            position: 0,
            max_len,
            dtype: None,
            attached: Attached::default(),
        }
    }

    /// Store keys and values as `dtype` (converted on append).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Entries held (prefix entries included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rotary position of the next token.
    pub fn position(&self) -> usize {
        self.position
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Bytes held by the cache tensors.
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| 2 * l.k.elem_count() * l.k.dtype().size_in_bytes())
            .sum()
    }

    /// Forget everything, a P-Tuning prefix included (keeps nothing allocated).
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            *l = None;
        }
        self.len = 0;
        self.position = 0;
        self.attached = Attached::default();
    }

    /// Drop the entries from `len` on (e.g. to undo a token).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            let removed = self.len - len;
            self.len = len;
            self.position = self.position.saturating_sub(removed);
        }
    }

    /// Make room in `layer` for `t` entries after the valid ones (keys and values of shape
    /// `[b, groups, _, d]`, `dtype`, on `device`) and return the whole allocated tensors
    /// `[b, groups, capacity, d]`. Growth is amortised as in [`Cache::append`].
    pub fn reserve(
        &mut self,
        layer: usize,
        t: usize,
        (b, g, d): (usize, usize, usize),
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let dtype = self.dtype.unwrap_or(dtype);
        let need = self.len + t;
        let slot = &mut self.layers[layer];
        let cap = slot.as_ref().map(|l| l.k.dims()[2]).unwrap_or(0);
        if need > cap {
            let new_cap = need
                .max(2 * cap)
                .div_ceil(GROW_STEP)
                .saturating_mul(GROW_STEP)
                .min(self.max_len.max(need));
            let grow = |old: Option<&Tensor>| -> Result<Tensor> {
                let extra = Tensor::zeros((b, g, new_cap - cap, d), dtype, device)?;
                match old {
                    Some(old) => Tensor::cat(&[old, &extra], 2),
                    None => Ok(extra),
                }
            };
            let nk = grow(slot.as_ref().map(|l| &l.k))?;
            let nv = grow(slot.as_ref().map(|l| &l.v))?;
            *slot = Some(LayerCache { k: nk, v: nv });
        }
        let lc = slot.as_ref().expect("allocated above");
        Ok((lc.k.clone(), lc.v.clone()))
    }

    /// Write `k`, `v` (`[b, groups, t, kv_channels]`, contiguous) of layer `layer` at the end and
    /// return views of all valid keys and values `[b, groups, len + t, kv_channels]`.
    /// Call [`Cache::advance`] once all layers of a step have appended.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.dtype {
            Some(dt) => (k.to_dtype(dt)?, v.to_dtype(dt)?),
            None => (k.clone(), v.clone()),
        };
        let (b, g, t, d) = k.dims4()?;
        let need = self.len + t;
        let (kc, vc) = self.reserve(layer, t, (b, g, d), k.dtype(), k.device())?;
        kc.slice_set(&k.contiguous()?, 2, self.len)?;
        vc.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((kc.narrow(2, 0, need)?, vc.narrow(2, 0, need)?))
    }

    /// Mark `t` new entries as valid; `rotary` says whether they advance the rotary position
    /// (prompt tokens do, P-Tuning prefix entries do not).
    pub fn advance(&mut self, t: usize, rotary: bool) {
        self.len += t;
        if rotary {
            self.position += t;
        }
    }

    /// The valid keys and values of a layer (`None` before the first append).
    pub fn layer(&self, layer: usize) -> Result<Option<(Tensor, Tensor)>> {
        match &self.layers[layer] {
            Some(lc) => Ok(Some((
                lc.k.narrow(2, 0, self.len)?,
                lc.v.narrow(2, 0, self.len)?,
            ))),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_keeps_values() -> Result<()> {
        let dev = Device::Cpu;
        let mut c = Cache::new(1, 4096);
        let mut all = vec![];
        for step in 0..300 {
            let t = if step == 0 { 5 } else { 1 };
            let k = Tensor::rand(0f32, 1f32, (1, 2, t, 4), &dev)?;
            let (ka, va) = c.append(0, &k, &(&k * 2.0)?)?;
            c.advance(t, true);
            all.push(k);
            let expect = Tensor::cat(&all, 2)?;
            assert_eq!(ka.dims(), expect.dims());
            let diff = (ka - &expect)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0);
            let diff = (va - (expect * 2.0)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(diff, 0.0);
        }
        assert_eq!(c.len(), 304);
        // capacity grew in steps, never one slot at a time
        assert_eq!(c.allocated_bytes(), 2 * 2 * 512 * 4 * 4);
        c.truncate(10);
        assert_eq!((c.len(), c.position()), (10, 10));
        Ok(())
    }

    #[test]
    fn attached_state_is_not_cloned_and_is_cleared() {
        let mut c = Cache::new(1, 16);
        c.attached = Attached(Some(Box::new(7u32)));
        assert!(c.clone().attached.0.is_none());
        assert!(c.attached.0.is_some());
        c.truncate(0);
        assert!(c.attached.0.is_some(), "truncating keeps the buffers");
        c.clear();
        assert!(c.attached.0.is_none());
    }
}
