//! The paged KV cache's memory: one pool of fixed-size blocks per model, shared by every
//! sequence (`../shared/design.md`, phase 2). A block holds `block_size` consecutive positions of
//! keys and values for every layer; a sequence ([`super::kv_cache::Cache`]) owns a table of block
//! ids, so appending never moves what is stored and a full block can be shared by many tables
//! (reference counted: P-Tuning prefixes, cloned caches, and the prefix cache built on it).
//!
//! Layout: the pool grows in *slabs* (never reallocated, so no block ever moves): per layer one
//! key and one value tensor `[slab_blocks * block_size, groups, kv_channels]` on that layer's
//! device. Block `b` is rows `(b % slab_blocks) * block_size ..` of slab `b / slab_blocks`; a
//! position's key of one group is `kv_channels` contiguous values, and consecutive positions of a
//! block are `groups * kv_channels` apart (vLLM's `[blocks, block_size, kv_heads, head_size]`).
//! Slabs are allocated when the blocks run out, up to the pool's byte limit; a CUDA kernel finds a
//! slab through a device table of slab addresses per layer ([`KvPool::slab_table`]).

mod io;
mod memory;
pub use memory::KvMemory;

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// Positions per block unless set ([`PoolOptions::block_size`]): 16, as vLLM's. Measured on an
/// H200 (docs/benchmarks.md, session 7), blocks of 16 to 128 decode and prefill equally fast
/// within run-to-run spread; the prefix cache finds more with small blocks (a multi-turn
/// conversation's 10th turn started as fast as its first with 16, 2.8x slower with 64).
pub const DEFAULT_BLOCK_SIZE: usize = 16;
/// A slab holds about this many bytes over all layers (the pool's growth step).
const SLAB_BYTES: usize = 64 << 20;
/// Slabs a pool without a byte limit may hold (its slab tables' length).
const UNLIMITED_SLABS: usize = 4096;
/// The largest slab, in blocks.
const MAX_SLAB_BLOCKS: usize = 1024;

/// How a model's KV pool is laid out and how large it may grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolOptions {
    /// Positions per block: a power of two from 16 to 1024.
    pub block_size: usize,
    /// The most bytes the pool's keys and values may take (`None`: no limit but the device's).
    pub max_bytes: Option<u64>,
    /// Keep full blocks findable by their tokens (the automatic prefix cache).
    pub prefix_cache: bool,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            max_bytes: None,
            prefix_cache: true,
        }
    }
}

impl PoolOptions {
    pub fn validate(&self) -> Result<()> {
        let bs = self.block_size;
        if !(16..=1024).contains(&bs) || !bs.is_power_of_two() {
            return Err(Error::invalid(format!(
                "kv block size must be a power of two from 16 to 1024, not {bs}"
            )));
        }
        Ok(())
    }
}

/// One growth step of the pool: every layer's keys and values for `slab_blocks` blocks.
struct Slab {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

/// Reference counts, the free list and the prefix cache's index (under one lock).
#[derive(Default)]
struct Alloc {
    /// Per block created so far: how many tables hold it (0: free or cached).
    refs: Vec<u32>,
    /// Free blocks holding nothing findable, the lowest id first: a sequence's blocks tend to
    /// follow each other in a slab (fewer pieces to gather) and the slabs in use stay few.
    free: BinaryHeap<Reverse<u32>>,
    /// Per block: its key in `index` (a full block registered by the prefix cache).
    key: Vec<Option<u64>>,
    /// Prefix cache: key (hash of the block's tokens and of every token before it) -> block.
    index: HashMap<u64, u32>,
    /// Cached blocks no table holds, by the time they were let go (the oldest evicted first
    /// when a block is needed and none is free).
    idle: BTreeMap<u64, u32>,
    /// Per block: its entry in `idle`.
    idle_at: Vec<u64>,
    clock: u64,
}

/// What the prefix cache did (tokens), for monitoring.
#[derive(Debug, Default)]
pub struct PrefixStats {
    /// Prompt tokens looked up.
    pub queries: AtomicU64,
    /// Of those, tokens found in cached blocks.
    pub hits: AtomicU64,
}

/// The key of a full block: its tokens (`ids`, those of the block's positions after any
/// P-Tuning prefix) chained to the key of the block before it (`parent`; the first block's is
/// the model's salt), so equal keys mean equal keys and values.
pub fn block_key(parent: u64, ids: &[u32]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    ids.hash(&mut h);
    h.finish()
}

/// The block pool of one model (see the module documentation).
pub struct KvPool {
    block_size: usize,
    slab_blocks: usize,
    groups: usize,
    head_dim: usize,
    dtype: DType,
    /// Per layer: the device holding its part of every block.
    layer_devices: Vec<Device>,
    /// Blocks the byte limit allows (whole slabs).
    max_blocks: usize,
    slabs: Box<[OnceLock<Slab>]>,
    alloc: Mutex<Alloc>,
    prefix_cache: bool,
    stats: PrefixStats,
    /// Per distinct CUDA device: `[layers, 2, max_slabs]` slab addresses (u64 as two u32 words).
    #[cfg(feature = "cuda")]
    slab_tables: Vec<Tensor>,
    /// Per CUDA device where `flash_wgmma` runs (16-bit, head_dim 128): `[layers, max_slabs, 4]`
    /// tensor maps of the slabs' keys and values (`kernels::cuda::kv_tensor_map`, 128 bytes
    /// each: keys and values in boxes of a block, then in boxes of 128 positions; 56 MiB for 28
    /// layers of a pool without a byte limit).
    #[cfg(feature = "cuda")]
    tensor_maps: Vec<Tensor>,
    /// A slab's tensor map could not be encoded: the prompts take the mma.sync kernel.
    #[cfg(feature = "cuda")]
    maps_failed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("block_size", &self.block_size)
            .field("slab_blocks", &self.slab_blocks)
            .field("max_blocks", &self.max_blocks)
            .field("blocks_in_use", &self.blocks_in_use())
            .finish()
    }
}

impl KvPool {
    /// A pool for `layer_devices.len()` layers of `groups` key/value heads of `head_dim`
    /// channels in `dtype`. Nothing is allocated until the first block is taken.
    pub fn new(
        opts: PoolOptions,
        layer_devices: Vec<Device>,
        groups: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Result<Self> {
        opts.validate()?;
        let bs = opts.block_size;
        let layers = layer_devices.len().max(1);
        let block_bytes = 2 * layers * bs * groups * head_dim * dtype.size_in_bytes();
        let mut slab_blocks = (SLAB_BYTES / block_bytes.max(1))
            .clamp(1, MAX_SLAB_BLOCKS)
            .next_power_of_two()
            .min(MAX_SLAB_BLOCKS);
        let max_slabs = match opts.max_bytes {
            Some(b) => {
                let blocks = (b / block_bytes.max(1) as u64) as usize;
                if blocks == 0 {
                    return Err(Error::invalid(format!(
                        "the KV cache limit of {b} bytes holds no block of {bs} positions ({block_bytes} bytes): raise kv_cache_memory or lower the block size"
                    )));
                }
                // at least 8 slabs under the limit (or slabs of one block), so that whole slabs
                // waste at most an eighth of it
                let eighth = (blocks / 8).max(1);
                slab_blocks = slab_blocks.min(1 << eighth.ilog2());
                blocks / slab_blocks
            }
            // no limit given: the device's memory stops it first
            None => UNLIMITED_SLABS,
        };
        #[cfg(feature = "cuda")]
        let slab_tables = {
            let mut t = vec![];
            for d in &layer_devices {
                if d.is_cuda() && !t.iter().any(|x: &Tensor| x.device().same_device(d)) {
                    t.push(Tensor::zeros(layers * 2 * max_slabs * 2, DType::U32, d)?);
                }
            }
            t
        };
        #[cfg(feature = "cuda")]
        let tensor_maps = {
            let mut t = vec![];
            if head_dim == 128 && dtype.size_in_bytes() == 2 {
                for d in &layer_devices {
                    if crate::kernels::cuda::wgmma_device(d)
                        && !t.iter().any(|x: &Tensor| x.device().same_device(d))
                    {
                        let words = layers * max_slabs * 4 * crate::kernels::cuda::TENSOR_MAP_WORDS;
                        t.push(Tensor::zeros(words, DType::U32, d)?);
                    }
                }
            }
            t
        };
        Ok(Self {
            block_size: bs,
            slab_blocks,
            groups,
            head_dim,
            dtype,
            layer_devices,
            max_blocks: max_slabs * slab_blocks,
            slabs: (0..max_slabs).map(|_| OnceLock::new()).collect(),
            alloc: Mutex::new(Alloc::default()),
            prefix_cache: opts.prefix_cache,
            stats: PrefixStats::default(),
            #[cfg(feature = "cuda")]
            slab_tables,
            #[cfg(feature = "cuda")]
            tensor_maps,
            #[cfg(feature = "cuda")]
            maps_failed: Default::default(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks per slab (a power of two).
    pub fn slab_blocks(&self) -> usize {
        self.slab_blocks
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn num_layers(&self) -> usize {
        self.layer_devices.len()
    }

    /// The most blocks the pool may hold.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks
    }

    /// Bytes of one block over all layers (keys and values).
    pub fn block_bytes(&self) -> usize {
        2 * self.layer_devices.len()
            * self.block_size
            * self.groups
            * self.head_dim
            * self.dtype.size_in_bytes()
    }

    /// Blocks held by at least one table.
    pub fn blocks_in_use(&self) -> usize {
        let a = self.lock();
        a.refs.len() - a.free.len() - a.idle.len()
    }

    /// Blocks allocated on the devices (in use, cached or free).
    pub fn blocks_allocated(&self) -> usize {
        self.lock().refs.len()
    }

    /// Blocks no table holds that still hold a findable prefix (evicted when needed).
    pub fn blocks_cached(&self) -> usize {
        self.lock().idle.len()
    }

    /// Blocks a sequence could still take: free, cached (evictable) and not yet allocated.
    pub fn blocks_available(&self) -> usize {
        let a = self.lock();
        a.free.len() + a.idle.len() + (self.max_blocks - a.refs.len())
    }

    /// Whether full blocks are kept findable by their tokens.
    pub fn prefix_cache(&self) -> bool {
        self.prefix_cache
    }

    /// Prompt tokens looked up in the prefix cache, and found.
    pub fn prefix_stats(&self) -> (u64, u64) {
        (
            self.stats.queries.load(Ordering::Relaxed),
            self.stats.hits.load(Ordering::Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Alloc> {
        // a panic elsewhere while holding the lock leaves consistent counts (every update is one
        // statement): keep going
        self.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free block, its count set to 1: a free one, else the cached block let go longest ago
    /// (no longer findable), else one of a new slab. (Memory grows with what running sequences
    /// need; the prefix cache lives in the blocks they left.)
    pub fn take(&self) -> Result<u32> {
        let mut a = self.lock();
        if let Some(Reverse(b)) = a.free.pop() {
            a.refs[b as usize] = 1;
            return Ok(b);
        }
        if let Some((_, b)) = a.idle.pop_first() {
            if let Some(k) = a.key[b as usize].take() {
                a.index.remove(&k);
            }
            a.refs[b as usize] = 1;
            return Ok(b);
        }
        let slab = a.refs.len() / self.slab_blocks;
        if slab >= self.slabs.len() {
            return Err(Error::invalid(format!(
                "the KV cache is full: {} blocks of {} positions ({} bytes each) are in use; raise kv_cache_memory or run fewer or shorter sequences",
                self.max_blocks,
                self.block_size,
                self.block_bytes()
            )));
        }
        self.grow(slab)?;
        let first = a.refs.len() as u32;
        let n = self.slab_blocks;
        a.refs.extend(std::iter::repeat_n(0, n));
        a.key.extend(std::iter::repeat_n(None, n));
        a.idle_at.extend(std::iter::repeat_n(0, n));
        a.free
            .extend((first + 1..first + self.slab_blocks as u32).map(Reverse));
        a.refs[first as usize] = 1;
        Ok(first)
    }

    /// Allocate slab `i` (under the allocation lock) and publish its addresses.
    fn grow(&self, i: usize) -> Result<()> {
        let rows = self.slab_blocks * self.block_size;
        let mut k = Vec::with_capacity(self.layer_devices.len());
        let mut v = Vec::with_capacity(self.layer_devices.len());
        for d in &self.layer_devices {
            k.push(Tensor::zeros(
                (rows, self.groups, self.head_dim),
                self.dtype,
                d,
            )?);
            v.push(Tensor::zeros(
                (rows, self.groups, self.head_dim),
                self.dtype,
                d,
            )?);
        }
        #[cfg(feature = "cuda")]
        for table in &self.slab_tables {
            let max_slabs = self.slabs.len();
            for (l, d) in self.layer_devices.iter().enumerate() {
                if !d.same_device(table.device()) {
                    continue;
                }
                for (kv, t) in [&k[l], &v[l]].into_iter().enumerate() {
                    let a = crate::kernels::cuda::tensor_addr(t)?;
                    let at = ((l * 2 + kv) * max_slabs + i) * 2;
                    let words = Tensor::from_vec(vec![a as u32, (a >> 32) as u32], 2, d)?;
                    table.slice_set(&words, 0, at)?;
                }
            }
        }
        #[cfg(feature = "cuda")]
        for table in &self.tensor_maps {
            let max_slabs = self.slabs.len();
            let words = crate::kernels::cuda::TENSOR_MAP_WORDS;
            let box_rows = self.block_size.min(128);
            for (l, d) in self.layer_devices.iter().enumerate() {
                if !d.same_device(table.device()) {
                    continue;
                }
                let maps = [box_rows, 128]
                    .into_iter()
                    .flat_map(|rows| [(&k[l], rows), (&v[l], rows)])
                    .map(|(t, rows)| crate::kernels::cuda::kv_tensor_map(t, rows))
                    .collect::<candle_core::Result<Vec<_>>>()
                    .map(|m| m.concat());
                match maps {
                    Ok(m) => {
                        let at = (l * max_slabs + i) * 4 * words;
                        table.slice_set(&Tensor::from_vec(m, 4 * words, d)?, 0, at)?;
                    }
                    Err(e) => {
                        if !self
                            .maps_failed
                            .swap(true, std::sync::atomic::Ordering::Relaxed)
                        {
                            eprintln!("glm2rs: {e}; prompts take the mma.sync attention kernel");
                        }
                    }
                }
            }
        }
        if self.slabs[i].set(Slab { k, v }).is_err() {
            return Err(Error::invalid("KV pool: a slab was allocated twice"));
        }
        Ok(())
    }

    /// One more table holds `block` (a cached block no table held is in use again).
    pub fn retain(&self, block: u32) {
        let mut a = self.lock();
        let b = block as usize;
        if b >= a.refs.len() {
            return;
        }
        if a.refs[b] == 0 && a.key[b].is_some() {
            let t = a.idle_at[b];
            a.idle.remove(&t);
        }
        a.refs[b] += 1;
    }

    /// A table lets go of `block`; at zero it is free again, or cached (findable until
    /// evicted) when it holds a registered prefix.
    pub fn release(&self, block: u32) {
        let mut a = self.lock();
        let b = block as usize;
        if b >= a.refs.len() || a.refs[b] == 0 {
            return;
        }
        a.refs[b] -= 1;
        if a.refs[b] == 0 {
            if a.key[b].is_some() {
                a.clock += 1;
                let t = a.clock;
                a.idle.insert(t, block);
                a.idle_at[b] = t;
            } else {
                a.free.push(Reverse(block));
            }
        }
    }

    /// How many tables hold `block`.
    pub fn refs(&self, block: u32) -> u32 {
        self.lock().refs.get(block as usize).copied().unwrap_or(0)
    }

    /// Whether `block` is findable by its tokens (then nobody may write to it).
    pub fn is_cached(&self, block: u32) -> bool {
        self.lock()
            .key
            .get(block as usize)
            .is_some_and(|k| k.is_some())
    }

    /// Make the full block `block` findable under `key` (unless another block already is).
    pub fn register(&self, block: u32, key: u64) {
        if !self.prefix_cache {
            return;
        }
        let mut a = self.lock();
        let b = block as usize;
        if b >= a.refs.len() || a.key[b].is_some() || a.index.contains_key(&key) {
            return;
        }
        a.index.insert(key, block);
        a.key[b] = Some(key);
    }

    /// The blocks cached under `keys`, in order, as far as they are found (each retained for
    /// the caller). `tokens`: the prompt tokens the lookup is for, `per_block` of them found per
    /// block (for the statistics).
    pub fn lookup(&self, keys: &[u64], tokens: usize, per_block: &[usize]) -> Vec<u32> {
        let mut found = Vec::new();
        if !self.prefix_cache {
            return found;
        }
        let mut a = self.lock();
        for &k in keys {
            let Some(&b) = a.index.get(&k) else { break };
            let bi = b as usize;
            if a.refs[bi] == 0 {
                let t = a.idle_at[bi];
                a.idle.remove(&t);
            }
            a.refs[bi] += 1;
            found.push(b);
        }
        drop(a);
        let hit: usize = per_block.iter().take(found.len()).sum();
        self.stats
            .queries
            .fetch_add(tokens as u64, Ordering::Relaxed);
        self.stats.hits.fetch_add(hit as u64, Ordering::Relaxed);
        found
    }

    /// Slabs the pool may hold (the length of each slab table).
    pub fn max_slabs(&self) -> usize {
        self.slabs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max_bytes: Option<u64>) -> KvPool {
        let opts = PoolOptions {
            block_size: 16,
            max_bytes,
            ..Default::default()
        };
        KvPool::new(opts, vec![Device::Cpu; 2], 2, 4, DType::F32).unwrap()
    }

    #[test]
    fn blocks_are_counted_reused_and_limited() {
        let p = pool(None);
        let a = p.take().unwrap();
        let b = p.take().unwrap();
        assert_eq!((a, b), (0, 1), "a fresh slab hands out its blocks in order");
        p.retain(a);
        p.release(a);
        assert_eq!(p.refs(a), 1);
        p.release(a);
        assert_eq!((p.refs(a), p.blocks_in_use()), (0, 1));
        assert_eq!(p.take().unwrap(), a, "the lowest free block is taken first");
        let c = p.take().unwrap();
        p.release(b);
        p.release(c);
        assert_eq!(p.take().unwrap(), b, "the lowest free block is taken first");
        // a limit of 20 blocks: slabs of 2 (at least 8 slabs), all 20 blocks, then a clear error
        let small = pool(Some(20 * p.block_bytes() as u64 + 5));
        assert_eq!((small.slab_blocks(), small.max_blocks()), (2, 20));
        for _ in 0..20 {
            small.take().unwrap();
        }
        let e = small.take().unwrap_err().to_string();
        assert!(e.contains("KV cache is full"), "{e}");
        let opts = PoolOptions {
            block_size: 16,
            max_bytes: Some(1),
            ..Default::default()
        };
        let e = KvPool::new(opts, vec![Device::Cpu], 2, 4, DType::F32).unwrap_err();
        assert!(e.to_string().contains("holds no block"), "{e}");
        assert!(KvPool::new(
            PoolOptions {
                block_size: 1,
                max_bytes: Some(1),
                ..Default::default()
            },
            vec![Device::Cpu],
            2,
            4,
            DType::F32
        )
        .is_err());
    }

    #[test]
    fn cached_blocks_are_found_kept_and_evicted_oldest_first() {
        let p = pool(Some(4 * pool(None).block_bytes() as u64));
        assert_eq!(p.max_blocks(), 4);
        let (a, b) = (p.take().unwrap(), p.take().unwrap());
        let (ka, kb) = (
            block_key(7, &[1, 2]),
            block_key(block_key(7, &[1, 2]), &[3, 4]),
        );
        p.register(a, ka);
        p.register(b, kb);
        assert!(p.is_cached(a) && p.is_cached(b));
        p.release(b);
        p.release(a);
        assert_eq!(
            (p.blocks_in_use(), p.blocks_cached(), p.blocks_available()),
            (0, 2, 4)
        );
        // found in order, and only as far as the chain holds
        assert_eq!(p.lookup(&[ka, kb], 4, &[2, 2]), vec![a, b]);
        assert_eq!(p.lookup(&[ka, 99, kb], 6, &[2, 2, 2]), vec![a]);
        assert_eq!(p.prefix_stats(), (10, 6));
        assert_eq!((p.blocks_in_use(), p.blocks_cached()), (2, 0));
        p.release(a);
        p.release(a);
        p.release(b); // b let go after a: a is the older
                      // cached blocks are reused (oldest first) before the pool grows: memory follows the
                      // sequences' needs, the cache lives in what they left
        let c = p.take().unwrap();
        assert_eq!(c, a, "the cached block let go first is evicted first");
        assert!(!p.is_cached(a) && p.lookup(&[ka], 2, &[2]).is_empty());
        assert_eq!(p.take().unwrap(), b);
        assert_eq!(p.blocks_allocated(), 2);
        p.take().unwrap();
        p.take().unwrap();
        assert!(p.take().is_err());
    }

    #[test]
    fn write_gather_and_copy_round_trip() -> Result<()> {
        let p = pool(None);
        // a table out of slab order: 2 then 0 then 1
        let ids: Vec<u32> = (0..3).map(|_| p.take().unwrap()).collect();
        let table = [ids[2], ids[0], ids[1]];
        let n = 40; // 16 + 16 + 8
        let all_k = Tensor::arange(0f32, (n * 8) as f32, &Device::Cpu)?.reshape((n, 2, 4))?;
        let all_v = (&all_k * -1.0)?;
        for (i, &b) in table.iter().enumerate() {
            let rows = 16.min(n - i * 16);
            for l in 0..2 {
                let k = (all_k.narrow(0, i * 16, rows)? + l as f64)?.contiguous()?;
                let v = (all_v.narrow(0, i * 16, rows)? + l as f64)?.contiguous()?;
                p.write(l, b, 0, &k, &v)?;
            }
        }
        for l in 0..2 {
            let (k, v) = p.gather(l, &table, n)?;
            assert_eq!(k.dims(), &[1, 2, n, 4]);
            let want = (all_k.transpose(0, 1)?.unsqueeze(0)? + l as f64)?;
            let d = (k - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(d, 0.0);
            let want = (all_v.transpose(0, 1)?.unsqueeze(0)? + l as f64)?;
            let d = (v - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(d, 0.0);
        }
        // copy-on-write of a partial block keeps the copied rows
        let fresh = p.take().unwrap();
        p.copy_block(table[2], fresh, 8)?;
        let (a, _) = p.gather(1, &[table[0], table[1], fresh], n)?;
        let (b, _) = p.gather(1, &table, n)?;
        assert_eq!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
