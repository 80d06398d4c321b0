//! The KV cache of one sequence: a table of blocks in the model's [`KvPool`] (the paged KV
//! cache). It belongs to the caller, never to the model, so many sequences share one model and
//! one pool; appending never copies what is stored, and a clone shares every block (a block
//! written while shared is copied first).

use super::kv_pool::{block_key, KvPool};
use super::lora::UnmergedLora;
use crate::error::Result;
use candle_core::Tensor;
use std::sync::Arc;

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

/// One sequence's keys and values (every layer), as blocks of the model's pool, plus the number
/// of positions it holds.
#[derive(Debug)]
pub struct Cache {
    pool: Arc<KvPool>,
    /// Block ids, in position order: position `p` is row `p % block_size` of `blocks[p / block_size]`.
    blocks: Vec<u32>,
    /// Valid entries (prefix entries included).
    len: usize,
    /// Rotary position of the next token: `len` minus the P-Tuning prefix length.
    position: usize,
    /// Largest number of entries ever allowed (the model's context, a prefix included).
    max_len: usize,
    /// Entries that are not tokens (a P-Tuning prefix) at the start.
    prefix_len: usize,
    /// The tokens at positions `prefix_len .. len`.
    tokens: Vec<u32>,
    /// Prefix-cache keys of the full blocks from block `prefix_len / block_size` on, in order.
    chain: Vec<u64>,
    /// The key the first block's chains from (the model and its prefix).
    salt: u64,
    /// The block table on each CUDA device that reads it (`[max_len / block_size]` u32), with the
    /// first entry changed since it was written ([`Cache::device_blocks`]).
    #[cfg(feature = "cuda")]
    device_tables: Vec<(Tensor, usize)>,
    /// Backend state tied to the buffers above.
    pub(crate) attached: Attached,
    /// The LoRA adapter this sequence runs with (unmerged; see [`crate::model::lora`]).
    adapter: Option<Arc<UnmergedLora>>,
}

impl Clone for Cache {
    /// A cache holding the same blocks (each shared, copied before a write).
    fn clone(&self) -> Self {
        for &b in &self.blocks {
            self.pool.retain(b);
        }
        Self {
            pool: self.pool.clone(),
            blocks: self.blocks.clone(),
            len: self.len,
            position: self.position,
            max_len: self.max_len,
            prefix_len: self.prefix_len,
            tokens: self.tokens.clone(),
            chain: self.chain.clone(),
            salt: self.salt,
            #[cfg(feature = "cuda")]
            device_tables: vec![],
            attached: Attached::default(),
            adapter: self.adapter.clone(),
        }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        for &b in &self.blocks {
            self.pool.release(b);
        }
    }
}

impl Cache {
    /// An empty cache in `pool` for at most `max_len` entries.
    pub fn new(pool: Arc<KvPool>, max_len: usize) -> Self {
        Self {
            pool,
            blocks: vec![],
            len: 0,
            position: 0,
            max_len,
            prefix_len: 0,
            tokens: vec![],
            chain: vec![],
            salt: 0,
            #[cfg(feature = "cuda")]
            device_tables: vec![],
            attached: Attached::default(),
            adapter: None,
        }
    }

    /// A cache holding `blocks` (each retained here) with `len` entries that take no rotary
    /// position (a P-Tuning prefix).
    pub(crate) fn with_prefix(
        pool: Arc<KvPool>,
        max_len: usize,
        blocks: &[u32],
        len: usize,
    ) -> Self {
        for &b in blocks {
            pool.retain(b);
        }
        let mut c = Self::new(pool, max_len);
        c.blocks = blocks.to_vec();
        c.len = len;
        c.prefix_len = len;
        c
    }

    /// Chain this cache's prefix-cache keys from `salt` (the model and its P-Tuning prefix).
    pub(crate) fn with_salt(mut self, salt: u64) -> Self {
        self.salt = salt;
        self
    }

    /// Run this sequence with `adapter` (its prefix-cache keys kept apart from other adapters').
    pub(crate) fn with_adapter(mut self, adapter: Option<Arc<UnmergedLora>>) -> Self {
        if let Some(a) = &adapter {
            self.salt ^= a.salt();
        }
        self.adapter = adapter;
        self
    }

    /// The LoRA adapter this sequence runs with.
    pub fn adapter(&self) -> Option<&Arc<UnmergedLora>> {
        self.adapter.as_ref()
    }

    /// Take the longest run of cached blocks holding the start of `ids` (the prompt after what
    /// this fresh cache holds), leaving at least its last token to feed: the blocks are shared
    /// (found by their tokens' keys), the entries count as held. Returns how many of `ids` are
    /// now held.
    pub(crate) fn adopt_cached_prefix(&mut self, ids: &[u32]) -> usize {
        let bs = self.pool.block_size();
        if !self.pool.prefix_cache() || ids.len() < 2 || self.len != self.prefix_len {
            return 0;
        }
        let pre = self.prefix_len;
        let k0 = pre / bs;
        let usable = ids.len() - 1;
        let (mut keys, mut per) = (vec![], vec![]);
        let mut parent = self.salt;
        let mut k = k0;
        while (k + 1) * bs - pre <= usable {
            let lo = (k * bs).max(pre) - pre;
            let hi = (k + 1) * bs - pre;
            let key = block_key(parent, &ids[lo..hi]);
            keys.push(key);
            per.push(hi - lo);
            parent = key;
            k += 1;
        }
        let found = self.pool.lookup(&keys, ids.len(), &per);
        if found.is_empty() {
            return 0;
        }
        // the found blocks replace the table from block k0 on (a partial prefix block included:
        // the found one holds the same prefix entries)
        for b in self.blocks.drain(k0..) {
            self.pool.release(b);
        }
        let n = found.len();
        self.blocks.extend(found);
        self.mark_changed(k0);
        self.len = (k0 + n) * bs;
        let held = self.len - pre;
        self.position = held;
        self.tokens = ids[..held].to_vec();
        self.chain = keys[..n].to_vec();
        held
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

    /// The pool the blocks live in.
    pub fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    /// The block table.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Bytes of the blocks this cache holds (shared blocks counted in full).
    pub fn allocated_bytes(&self) -> usize {
        self.blocks.len() * self.pool.block_bytes()
    }

    /// Forget everything, a P-Tuning prefix included (every block given back).
    pub fn clear(&mut self) {
        for &b in &self.blocks {
            self.pool.release(b);
        }
        self.blocks.clear();
        self.len = 0;
        self.position = 0;
        self.prefix_len = 0;
        self.tokens.clear();
        self.chain.clear();
        self.mark_changed(0);
        self.attached = Attached::default();
    }

    /// Drop the entries from `len` on (e.g. to undo a token); blocks left empty are given back.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            let removed = self.len - len;
            self.len = len;
            self.position = self.position.saturating_sub(removed);
            let bs = self.pool.block_size();
            let keep = len.div_ceil(bs);
            for b in self.blocks.drain(keep..) {
                self.pool.release(b);
            }
            self.prefix_len = self.prefix_len.min(len);
            self.tokens.truncate(len - self.prefix_len);
            self.chain
                .truncate((len / bs).saturating_sub(self.prefix_len / bs));
            self.mark_changed(keep);
        }
    }

    /// Make positions `len .. len + t` writable by this cache alone: blocks taken from the pool
    /// as needed, and a shared last block (a prefix, a clone, a cached prefix) copied first. Call once per step,
    /// before any layer writes.
    pub fn reserve(&mut self, t: usize) -> Result<()> {
        let bs = self.pool.block_size();
        let need = (self.len + t).div_ceil(bs);
        let partial = self.len % bs;
        if t > 0 && partial != 0 {
            let i = self.len / bs;
            let b = self.blocks[i];
            if self.pool.refs(b) > 1 || self.pool.is_cached(b) {
                let fresh = self.pool.take()?;
                if let Err(e) = self.pool.copy_block(b, fresh, partial) {
                    self.pool.release(fresh);
                    return Err(e);
                }
                self.pool.release(b);
                self.blocks[i] = fresh;
                self.mark_changed(i);
            }
        }
        while self.blocks.len() < need {
            let b = self.pool.take()?;
            self.mark_changed(self.blocks.len());
            self.blocks.push(b);
        }
        Ok(())
    }

    /// Write `k`, `v` (`[1, groups, t, kv_channels]`) of `layer` at positions `len ..`
    /// (reserved by [`Cache::reserve`]). Call [`Cache::advance`] once all layers have written.
    pub fn write(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let dt = self.pool.dtype();
        let rows = |x: &Tensor| -> Result<Tensor> {
            Ok(x.squeeze(0)?.transpose(0, 1)?.to_dtype(dt)?.contiguous()?) // [t, groups, d]
        };
        let (k, v) = (rows(k)?, rows(v)?);
        let t = k.dim(0)?;
        let bs = self.pool.block_size();
        let mut done = 0;
        while done < t {
            let p = self.len + done;
            let at = p % bs;
            let n = (bs - at).min(t - done);
            let block = *self
                .blocks
                .get(p / bs)
                .ok_or_else(|| crate::error::Error::invalid("KV cache: write before reserve"))?;
            let (kp, vp) = if n == t {
                (k.clone(), v.clone())
            } else {
                (k.narrow(0, done, n)?, v.narrow(0, done, n)?)
            };
            self.pool.write(layer, block, at, &kp, &vp)?;
            done += n;
        }
        Ok(())
    }

    /// The keys and values of `layer` for the first `n` positions: `[1, groups, n, kv_channels]`.
    pub fn gather(&self, layer: usize, n: usize) -> Result<(Tensor, Tensor)> {
        self.pool.gather(layer, &self.blocks, n)
    }

    /// CPU decode attention of `q` (`[heads, head_dim]` f32) over this cache's first `n`
    /// positions of `layer`, read in place (`None` when the layer is not on the CPU).
    pub fn cpu_decode(
        &self,
        layer: usize,
        n: usize,
        q: &[f32],
        heads: usize,
        scale: f32,
    ) -> Result<Option<Vec<f32>>> {
        self.pool
            .cpu_decode(layer, &self.blocks, n, q, heads, scale)
    }

    /// Mark `t` new entries as valid; `rotary` says whether they advance the rotary position
    /// (prompt tokens do, P-Tuning prefix entries do not). Tokens go through
    /// [`Cache::advance_tokens`], which also feeds the prefix cache.
    pub fn advance(&mut self, t: usize, rotary: bool) {
        self.len += t;
        if rotary {
            self.position += t;
        } else if self.len - t == self.prefix_len {
            self.prefix_len += t;
        }
    }

    /// The entries of `ids` are written: mark them valid, and make each block they filled
    /// findable by its tokens (the prefix cache).
    pub fn advance_tokens(&mut self, ids: &[u32]) {
        self.len += ids.len();
        self.position += ids.len();
        self.tokens.extend_from_slice(ids);
        if !self.pool.prefix_cache() {
            return;
        }
        let (bs, pre) = (self.pool.block_size(), self.prefix_len);
        let k0 = pre / bs;
        loop {
            let k = k0 + self.chain.len();
            let end = (k + 1) * bs;
            if end > self.len || k >= self.blocks.len() {
                break;
            }
            let lo = (k * bs).max(pre) - pre;
            let parent = self.chain.last().copied().unwrap_or(self.salt);
            let key = block_key(parent, &self.tokens[lo..end - pre]);
            self.pool.register(self.blocks[k], key);
            self.chain.push(key);
        }
    }

    /// Table entries from `i` on changed: the device copies are rewritten from there.
    fn mark_changed(&mut self, _i: usize) {
        #[cfg(feature = "cuda")]
        for (_, dirty) in &mut self.device_tables {
            *dirty = (*dirty).min(_i);
        }
    }

    /// The block table on `device` (u32, room for `max_len` positions), written where it changed
    /// since the last call: what the CUDA kernels read.
    #[cfg(feature = "cuda")]
    pub(crate) fn device_blocks(&mut self, device: &candle_core::Device) -> Result<&Tensor> {
        let i = match self
            .device_tables
            .iter()
            .position(|(t, _)| t.device().same_device(device))
        {
            Some(i) if self.device_tables[i].0.elem_count() >= self.blocks.len() => i,
            found => {
                let cap = self
                    .max_len
                    .div_ceil(self.pool.block_size())
                    .max(self.blocks.len());
                let t = Tensor::zeros(cap, candle_core::DType::U32, device)?;
                match found {
                    Some(i) => {
                        self.device_tables[i] = (t, 0);
                        i
                    }
                    None => {
                        self.device_tables.push((t, 0));
                        self.device_tables.len() - 1
                    }
                }
            }
        };
        let n = self.blocks.len();
        let (table, dirty) = &mut self.device_tables[i];
        if *dirty < n {
            let words = Tensor::new(&self.blocks[*dirty..], device)?;
            table.slice_set(&words, 0, *dirty)?;
        }
        *dirty = n;
        Ok(table)
    }

    /// This sequence's part of a decode step of `layer` on `device` (the fused CUDA attention):
    /// the pool's slab tables, the block table on the device (written where it changed), length
    /// and rotary position, the split kernels planned for the next power of two of the length
    /// (at least 256). Call after [`Cache::reserve`] of the new token.
    #[cfg(feature = "cuda")]
    pub fn decode_seq(
        &mut self,
        layer: usize,
        device: &candle_core::Device,
    ) -> Result<crate::kernels::cuda::DecodeSeq> {
        let pool = self.pool.clone();
        let k_slabs = pool.slab_table(layer)?;
        let v_slabs = k_slabs + (pool.max_slabs() * 8) as u64;
        let blocks = crate::kernels::cuda::tensor_addr(self.device_blocks(device)?)?;
        let len = self.len;
        Ok(crate::kernels::cuda::DecodeSeq {
            k_slabs,
            v_slabs,
            maps: pool.tensor_maps(layer)?,
            blocks,
            block_size: pool.block_size(),
            slab_blocks: pool.slab_blocks(),
            dtype: pool.dtype(),
            len,
            rot: self.position,
            reach: (len + 1).next_power_of_two().max(256),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::kv_pool::PoolOptions;
    use super::*;
    use candle_core::{DType, Device};

    fn pool() -> Arc<KvPool> {
        let opts = PoolOptions {
            block_size: 16,
            max_bytes: None,
            ..Default::default()
        };
        Arc::new(KvPool::new(opts, vec![Device::Cpu], 2, 4, DType::F32).unwrap())
    }

    fn step(c: &mut Cache, k: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        c.reserve(t)?;
        c.write(0, k, &(k * 2.0)?)?;
        let out = c.gather(0, c.len() + t)?;
        c.advance(t, true);
        Ok(out)
    }

    #[test]
    fn appends_in_blocks_and_keeps_values() -> Result<()> {
        let dev = Device::Cpu;
        let p = pool();
        let mut c = Cache::new(p.clone(), 4096);
        let mut all = vec![];
        for i in 0..60 {
            let t = if i == 0 { 5 } else { 1 + i % 7 };
            let k = Tensor::rand(0f32, 1f32, (1, 2, t, 4), &dev)?;
            let (ka, va) = step(&mut c, &k)?;
            all.push(k);
            let expect = Tensor::cat(&all, 2)?;
            assert_eq!(ka.dims(), expect.dims());
            assert_eq!((ka - &expect)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
            assert_eq!(
                (va - (expect * 2.0)?)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?,
                0.0
            );
        }
        let n = c.len();
        assert_eq!(
            c.blocks().len(),
            n.div_ceil(16),
            "one block per 16 positions, no more"
        );
        assert_eq!(p.blocks_in_use(), c.blocks().len());
        c.truncate(10);
        assert_eq!((c.len(), c.position(), c.blocks().len()), (10, 10, 1));
        assert_eq!(p.blocks_in_use(), 1, "blocks past the end are given back");
        drop(c);
        assert_eq!(
            p.blocks_in_use(),
            0,
            "a dropped cache gives back every block"
        );
        Ok(())
    }

    #[test]
    fn a_clone_shares_blocks_and_copies_before_writing() -> Result<()> {
        let dev = Device::Cpu;
        let p = pool();
        let mut a = Cache::new(p.clone(), 4096);
        let k0 = Tensor::rand(0f32, 1f32, (1, 2, 20, 4), &dev)?; // a full block and 4 rows
        step(&mut a, &k0)?;
        let mut b = a.clone();
        assert_eq!(p.blocks_in_use(), 2, "the clone holds the same blocks");
        let ka = Tensor::rand(0f32, 1f32, (1, 2, 3, 4), &dev)?;
        let kb = Tensor::rand(0f32, 1f32, (1, 2, 3, 4), &dev)?;
        let (ga, _) = step(&mut a, &ka)?;
        let (gb, _) = step(&mut b, &kb)?;
        assert_eq!(a.blocks()[0], b.blocks()[0], "the full block stays shared");
        assert_ne!(
            a.blocks()[1],
            b.blocks()[1],
            "the written partial block was copied"
        );
        assert_eq!(p.blocks_in_use(), 3);
        let wa = Tensor::cat(&[&k0, &ka], 2)?;
        let wb = Tensor::cat(&[&k0, &kb], 2)?;
        assert_eq!((ga - wa)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        assert_eq!((gb - wb)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        drop(a);
        drop(b);
        assert_eq!(p.blocks_in_use(), 0);
        Ok(())
    }

    #[test]
    fn attached_state_is_not_cloned_and_is_cleared() {
        let mut c = Cache::new(pool(), 16);
        c.attached = Attached(Some(Box::new(7u32)));
        assert!(c.clone().attached.0.is_none());
        assert!(c.attached.0.is_some());
        c.truncate(0);
        assert!(c.attached.0.is_some(), "truncating keeps the buffers");
        c.clear();
        assert!(c.attached.0.is_none());
    }
}
