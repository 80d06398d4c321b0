//! The shape of a split (flash-decoding) decode step: how many dimensions each lane of
//! `decode_split` (`src/kernels/cuda/flash_decode.cuh`) holds, and how a step's positions are
//! cut into blocks. Plain arithmetic, kept apart from the CUDA launch code so that it is tested
//! on every machine.

/// Query heads per KV group `decode_split` takes (FD_R in flash_decode.cuh).
pub const SPLIT_MAX_HEADS_PER_GROUP: usize = 16;
/// Fewest positions a block of `decode_split` takes, and the step of its chunks (FD_WARPS *
/// FD_TILE positions per pass of the block's warps).
pub const SPLIT_MIN_CHUNK: usize = 64;
pub const SPLIT_CHUNK_STEP: usize = 32;
/// Most splits `decode_reduce` combines (FD_MAXSPLITS in flash_decode.cuh).
pub const SPLIT_MAX_SPLITS: usize = 1024;

/// Dimensions per lane (`E` in flash_decode.cuh) of the split decode kernel for these heads, or
/// `None` where it does not apply (more than 16 query heads per group, head_dim over 128 or not
/// a multiple of its lanes' share).
pub fn split_lanes(heads: usize, groups: usize, head_dim: usize) -> Option<usize> {
    if groups == 0
        || !heads.is_multiple_of(groups)
        || heads / groups > SPLIT_MAX_HEADS_PER_GROUP
        || !head_dim.is_multiple_of(2)
    {
        return None;
    }
    match head_dim {
        1..=32 => Some(1),
        33..=64 => Some(2),
        65..=128 if head_dim.is_multiple_of(4) => Some(4),
        _ => None,
    }
}

/// Caches from this capacity on take the split kernel whatever the batch.
pub const SPLIT_MIN_CAP: usize = 1024;
/// Batches from this many sequences on take the split kernel whatever their lengths.
pub const SPLIT_MIN_ROWS: usize = 32;

/// Whether the split kernel beats the one-block-per-head kernel for a step: measured on an H200
/// (`benches/gpu_bench.py`, 2026-12-02), the one-block kernel is faster for a few short
/// sequences (a 32-token prompt: 269 against 225 tokens/s at batch 1, 3,454 against 3,220 at
/// batch 16: it has a block per head to spread the new token's work over), the split kernel
/// for 64 sequences (11,040-13,164 against 9,684-9,845) and for long caches (it reads each key
/// once per group, in tiles, over the whole GPU).
pub fn split_pays(rows: usize, max_cap: usize) -> bool {
    max_cap >= SPLIT_MIN_CAP || rows >= SPLIT_MIN_ROWS
}

/// Blocks per (sequence, KV group) of a split decode step: `rows` sequences of `groups` KV
/// groups, caches of at most `max_cap` positions, on a GPU of `sms` multiprocessors: enough
/// blocks to fill the GPU twice over (`rows * groups * splits` near `2 * sms`), no more than
/// [`SPLIT_MIN_CHUNK`]-position chunks of the capacity. The count depends on the capacity, not
/// the length, so a captured graph stays valid while its cache does; each launch then cuts the
/// sequence's current length into `splits` chunks ([`split_chunk`]).
pub fn split_plan(rows: usize, groups: usize, max_cap: usize, sms: usize) -> usize {
    let units = (rows * groups).max(1);
    let most = max_cap
        .max(1)
        .div_ceil(SPLIT_MIN_CHUNK)
        .clamp(1, SPLIT_MAX_SPLITS);
    (2 * sms.max(1)).div_ceil(units).clamp(1, most)
}

/// Positions per block for a sequence of `n` entries cut into `splits` (`fd_chunk` in
/// flash_decode.cuh, which the kernels compute from the runtime length): at least
/// [`SPLIT_MIN_CHUNK`], a multiple of [`SPLIT_CHUNK_STEP`], `splits` of them cover `n`.
pub fn split_chunk(n: usize, splits: usize) -> usize {
    let c = n.div_ceil(splits.max(1)).div_ceil(SPLIT_CHUNK_STEP) * SPLIT_CHUNK_STEP;
    c.max(SPLIT_MIN_CHUNK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_follow_the_head_dimension_and_the_group_width() {
        assert_eq!(split_lanes(32, 2, 128), Some(4)); // chatglm2-6b, chatglm3-6b
        assert_eq!(split_lanes(4, 2, 8), Some(1)); // the tiny fixture
        assert_eq!(split_lanes(8, 4, 64), Some(2));
        assert_eq!(split_lanes(8, 2, 96), Some(4));
        assert_eq!(split_lanes(32, 1, 128), None); // 32 query heads on one group
        assert_eq!(split_lanes(32, 2, 256), None);
        assert_eq!(split_lanes(32, 2, 126), None); // not a multiple of 4 lanes' share
        assert_eq!(split_lanes(6, 4, 128), None);
        assert_eq!(split_lanes(4, 0, 128), None);
        assert_eq!(split_lanes(4, 2, 7), None); // rotary pairs need an even head_dim
    }

    #[test]
    fn short_steps_of_few_sequences_keep_the_one_block_kernel() {
        assert!(!split_pays(1, 256));
        assert!(!split_pays(16, 512));
        assert!(split_pays(64, 256));
        assert!(split_pays(1, 2_304));
        assert!(split_pays(1, 32_768));
    }

    #[test]
    fn plans_cover_the_cache_fill_the_gpu_and_keep_chunks_long() {
        for &(rows, groups, cap, sms) in &[
            (1, 2, 32_768, 132),
            (1, 2, 8_448, 132),
            (1, 2, 2_304, 132),
            (1, 2, 300, 132),
            (1, 2, 1, 132),
            (64, 2, 4_352, 132),
            (16, 2, 512, 132),
            (3, 2, 100_000, 1),
            (1, 1, 1 << 20, 4096),
        ] {
            let splits = split_plan(rows, groups, cap, sms);
            assert!((1..=SPLIT_MAX_SPLITS).contains(&splits));
            assert!(
                rows * groups * (splits - 1) < 2 * sms,
                "no more splits than fill the GPU"
            );
            assert!(
                splits == 1 || cap > SPLIT_MIN_CHUNK * (splits - 1),
                "{cap}: {splits}"
            );
            // every length the cache can hold is covered, in chunks of whole steps
            for n in (1..=cap).step_by((cap / 97).max(1)).chain([cap]) {
                let chunk = split_chunk(n, splits);
                assert!(chunk * splits >= n, "{n} in {splits} x {chunk}");
                assert!(chunk.is_multiple_of(SPLIT_CHUNK_STEP) && chunk >= SPLIT_MIN_CHUNK);
            }
        }
        // a single 32K sequence spreads over the whole GPU; 64 sequences of 4K need few splits
        let splits = split_plan(1, 2, 32_768, 132);
        assert!(2 * splits >= 132, "{splits}");
        assert!(split_plan(64, 2, 4_352, 132) <= 3);
    }
}
