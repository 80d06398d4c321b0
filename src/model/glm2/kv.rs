//! The KV side of [`Glm2Model`]: its block pool (`set_kv_pool`), the P-Tuning prefix written
//! once into blocks every cache shares (`set_prefix`), and the caches a sequence starts with
//! (`new_cache`, `cache_for_prompt` with the prefix cache's lookup).

use super::{to_other_device, Glm2Model};
use crate::error::Result;
use crate::model::kv_cache::Cache;
use crate::model::kv_pool::{KvPool, PoolOptions};
use std::sync::Arc;

/// A P-Tuning prefix held in the pool: a cache nobody writes to, whose blocks every new cache
/// starts with.
#[derive(Debug)]
pub(super) struct PrefixBlocks {
    cache: Cache,
}

impl Glm2Model {
    /// Put a P-Tuning v2 prefix in front of every new cache (each layer's part moved to that
    /// layer's device and written once into blocks of the pool that every cache shares).
    pub fn set_prefix(&mut self, prefix: Option<crate::model::prefix::Prefix>) -> Result<()> {
        self.prefix = match prefix {
            Some(mut p) => {
                for (i, d) in self.layer_devices.iter().enumerate() {
                    p.keys[i] = to_other_device(&p.keys[i], d)?;
                    p.values[i] = to_other_device(&p.values[i], d)?;
                }
                Some(p)
            }
            None => None,
        };
        self.pin_prefix()
    }

    /// Lay out the KV cache anew: block size and byte limit of the pool every later cache takes
    /// its blocks from (caches made before keep the old pool until dropped).
    pub fn set_kv_pool(&mut self, opts: PoolOptions) -> Result<()> {
        self.kv = Arc::new(KvPool::new(
            opts,
            self.layer_devices.clone(),
            self.config.kv_groups(),
            self.config.kv_channels,
            self.dtype,
        )?);
        self.pin_prefix()
    }

    /// The pool of this model's KV caches.
    pub fn kv_pool(&self) -> &Arc<KvPool> {
        &self.kv
    }

    /// Write the prefix (if any) into blocks of the current pool.
    fn pin_prefix(&mut self) -> Result<()> {
        static SALTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        self.kv_salt = SALTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.prefix_blocks = None;
        let Some(p) = &self.prefix else {
            return Ok(());
        };
        let mut c = Cache::new(self.kv.clone(), p.len);
        c.reserve(p.len)?;
        for (i, (k, v)) in p.keys.iter().zip(&p.values).enumerate() {
            c.write(i, k, v)?;
        }
        c.advance(p.len, false);
        self.prefix_blocks = Some(Arc::new(PrefixBlocks { cache: c }));
        Ok(())
    }

    /// A fresh cache for one sequence: empty, or holding the P-Tuning prefix (its blocks shared).
    pub fn new_cache(&self) -> Cache {
        let max = self.config.seq_length + self.prefix_len();
        let c = match &self.prefix_blocks {
            Some(p) => Cache::with_prefix(self.kv.clone(), max, p.cache.blocks(), p.cache.len()),
            None => Cache::new(self.kv.clone(), max),
        };
        c.with_salt(self.kv_salt).with_adapter(self.adapter.clone())
    }

    /// A fresh cache for a sequence starting with `ids`, holding already the longest run of
    /// cached blocks (the prefix cache) that starts it, leaving at least one id to run. Returns
    /// the cache and how many of `ids` it holds.
    pub fn cache_for_prompt(&self, ids: &[u32]) -> (Cache, usize) {
        let mut c = self.new_cache();
        let held = c.adopt_cached_prefix(ids);
        (c, held)
    }
}
