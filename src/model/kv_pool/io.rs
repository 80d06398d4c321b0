//! Reading and writing the blocks' contents: keys and values into a block, a block copied
//! (copy-on-write), a sequence's blocks gathered for the reference attention, read in place by
//! the CPU decode attention, and the slab addresses the CUDA kernels read.

use super::{KvPool, Slab};
use crate::error::{Error, Result};
use candle_core::Tensor;

impl KvPool {
    fn slab(&self, block: u32) -> Result<&Slab> {
        self.slabs
            .get(block as usize / self.slab_blocks)
            .and_then(|s| s.get())
            .ok_or_else(|| Error::invalid(format!("KV pool: block {block} was never allocated")))
    }

    /// First row of `block` in its slab.
    fn row(&self, block: u32) -> usize {
        (block as usize % self.slab_blocks) * self.block_size
    }

    /// Write `k`, `v` (`[t, groups, kv_channels]`, contiguous, the pool's dtype) of `layer` at
    /// offset `at` of `block` (`at + t <= block_size`).
    pub fn write(&self, layer: usize, block: u32, at: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let slab = self.slab(block)?;
        let row = self.row(block) + at;
        slab.k[layer].slice_set(k, 0, row)?;
        slab.v[layer].slice_set(v, 0, row)?;
        Ok(())
    }

    /// Copy the first `rows` positions of `src` to `dst`, every layer (copy-on-write).
    pub fn copy_block(&self, src: u32, dst: u32, rows: usize) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let (s, d) = (self.slab(src)?, self.slab(dst)?);
        let (sr, dr) = (self.row(src), self.row(dst));
        for l in 0..self.layer_devices.len() {
            d.k[l].slice_set(&s.k[l].narrow(0, sr, rows)?.copy()?, 0, dr)?;
            d.v[l].slice_set(&s.v[l].narrow(0, sr, rows)?.copy()?, 0, dr)?;
        }
        Ok(())
    }

    /// The first `n` positions of a table's keys and values of `layer`, gathered:
    /// `[1, groups, n, kv_channels]` each, contiguous (for the attention that reads whole
    /// tensors). Runs of blocks that follow each other in a slab are read as one piece.
    pub fn gather(&self, layer: usize, blocks: &[u32], n: usize) -> Result<(Tensor, Tensor)> {
        let bs = self.block_size;
        let mut kp = Vec::new();
        let mut vp = Vec::new();
        let mut i = 0;
        let need = n.div_ceil(bs);
        if blocks.len() < need {
            return Err(Error::invalid(format!(
                "KV cache: {n} positions need {need} blocks, the table has {}",
                blocks.len()
            )));
        }
        while i < need {
            // the run of blocks i..j adjacent in one slab
            let mut j = i + 1;
            while j < need
                && blocks[j] == blocks[j - 1] + 1
                && !(blocks[j] as usize).is_multiple_of(self.slab_blocks)
            {
                j += 1;
            }
            let rows = (j * bs).min(n) - i * bs;
            let slab = self.slab(blocks[i])?;
            let row = self.row(blocks[i]);
            kp.push(slab.k[layer].narrow(0, row, rows)?);
            vp.push(slab.v[layer].narrow(0, row, rows)?);
            i = j;
        }
        let join = |p: Vec<Tensor>| -> Result<Tensor> {
            let t = if p.len() == 1 {
                p.into_iter().next().expect("one piece")
            } else {
                Tensor::cat(&p, 0)?
            };
            Ok(t.transpose(0, 1)?.contiguous()?.unsqueeze(0)?) // [1, groups, n, d]
        };
        Ok((join(kp)?, join(vp)?))
    }

    /// Decode attention on the CPU of `q` (`[heads, head_dim]` f32) over the first `n` positions
    /// of the sequence with table `blocks`, read in place from the slabs
    /// ([`crate::kernels::cpu_attention::decode`]): `[heads, head_dim]` f32. `None` when the
    /// layer is not on the CPU.
    pub fn cpu_decode(
        &self,
        layer: usize,
        blocks: &[u32],
        n: usize,
        q: &[f32],
        heads: usize,
        scale: f32,
    ) -> Result<Option<Vec<f32>>> {
        use crate::kernels::cpu_attention::{decode, PagedLayer, Rows};
        use candle_core::{CpuStorage, Storage};
        if !self.layer_devices[layer].is_cpu() {
            return Ok(None);
        }
        let used = blocks
            .iter()
            .take(n.div_ceil(self.block_size))
            .map(|&b| b as usize / self.slab_blocks + 1)
            .max()
            .unwrap_or(0);
        let mut guards = Vec::with_capacity(2 * used);
        for i in 0..used {
            let s = self.slabs[i]
                .get()
                .ok_or_else(|| Error::invalid(format!("KV pool: slab {i} was never allocated")))?;
            guards.push(s.k[layer].storage_and_layout().0);
            guards.push(s.v[layer].storage_and_layout().0);
        }
        fn rows(s: &Storage) -> Result<Rows<'_>> {
            Ok(match s {
                Storage::Cpu(CpuStorage::F32(v)) => Rows::F32(v),
                Storage::Cpu(CpuStorage::F16(v)) => Rows::F16(v),
                Storage::Cpu(CpuStorage::BF16(v)) => Rows::BF16(v),
                _ => return Err(Error::invalid("KV pool: unsupported CPU storage")),
            })
        }
        let mut k = Vec::with_capacity(used);
        let mut v = Vec::with_capacity(used);
        for pair in guards.chunks(2) {
            k.push(rows(&pair[0])?);
            v.push(rows(&pair[1])?);
        }
        let view = PagedLayer {
            k,
            v,
            block_size: self.block_size,
            slab_blocks: self.slab_blocks,
            groups: self.groups,
            head_dim: self.head_dim,
        };
        Ok(Some(decode(&view, blocks, n, q, heads, scale)))
    }

    /// The device address of the table of `layer`'s key slab addresses (the value slabs' table
    /// follows at `+ max_slabs * 8` bytes), on the layer's CUDA device.
    #[cfg(feature = "cuda")]
    pub fn slab_table(&self, layer: usize) -> Result<u64> {
        let d = &self.layer_devices[layer];
        let t = self
            .slab_tables
            .iter()
            .find(|t| t.device().same_device(d))
            .ok_or_else(|| Error::invalid("KV pool: no slab table on this device"))?;
        let base = crate::kernels::cuda::tensor_addr(t)?;
        Ok(base + (layer * 2 * self.slabs.len() * 8) as u64)
    }

    /// The device address of `layer`'s slab tensor maps (per slab four: `DecodeSeq::maps`), 0 where the pool keeps none (not a Hopper GPU, not head_dim 128,
    /// or encoding failed).
    #[cfg(feature = "cuda")]
    pub fn tensor_maps(&self, layer: usize) -> Result<u64> {
        let d = &self.layer_devices[layer];
        let Some(t) = self.tensor_maps.iter().find(|t| t.device().same_device(d)) else {
            return Ok(0);
        };
        if self.maps_failed.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(0);
        }
        let words = crate::kernels::cuda::TENSOR_MAP_WORDS;
        Ok(crate::kernels::cuda::tensor_addr(t)?
            + (layer * self.slabs.len() * 4 * words * 4) as u64)
    }
}
