//! The shape of a split (flash-decoding) decode step: how many dimensions each lane of
//! `decode_split` (`src/kernels/cuda/flash_decode.cuh`) holds, and how a step's positions are
//! cut into blocks. Plain arithmetic, kept apart from the CUDA launch code so that it is tested
//! on every machine.

/// Query heads per KV group `decode_split` takes (FD_R in flash_decode.cuh).
pub const SPLIT_MAX_HEADS_PER_GROUP: usize = 16;
/// Fewest positions a block of `decode_split` takes, and the step of its chunks (FD_WARPS *
/// FD_TILE positions per pass of the block's warps).
pub const SPLIT_MIN_CHUNK: usize = 128;
pub const SPLIT_CHUNK_STEP: usize = 32;

/// Dimensions per lane (`E` in flash_decode.cuh) of the split decode kernel for these heads, or
/// `None` where it does not apply (more than 16 query heads per group, head_dim over 128 or not
/// a multiple of its lanes' share).
pub fn split_lanes(heads: usize, groups: usize, head_dim: usize) -> Option<usize> {
    if groups == 0 || heads % groups != 0 || heads / groups > SPLIT_MAX_HEADS_PER_GROUP {
        return None;
    }
    match head_dim {
        1..=32 => Some(1),
        33..=64 if head_dim % 2 == 0 => Some(2),
        65..=128 if head_dim % 4 == 0 => Some(4),
        _ => None,
    }
}

/// `(chunk, splits)` of a split decode step: `rows` sequences of `groups` KV groups, caches of at
/// most `max_cap` positions, on a GPU of `sms` multiprocessors. Enough blocks to fill the GPU
/// twice over (`rows * groups * splits` near `2 * sms`), none with fewer than
/// [`SPLIT_MIN_CHUNK`] positions; `chunk * splits` covers `max_cap`. The plan depends on the
/// capacity, not the length, so a captured graph stays valid while its cache does.
pub fn split_plan(rows: usize, groups: usize, max_cap: usize, sms: usize) -> (usize, usize) {
    let max_cap = max_cap.max(1);
    let units = (rows * groups).max(1);
    let most = max_cap.div_ceil(SPLIT_MIN_CHUNK).max(1);
    let splits = (2 * sms.max(1)).div_ceil(units).clamp(1, most);
    let chunk = max_cap.div_ceil(splits).div_ceil(SPLIT_CHUNK_STEP) * SPLIT_CHUNK_STEP;
    (chunk, max_cap.div_ceil(chunk))
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
        ] {
            let (chunk, splits) = split_plan(rows, groups, cap, sms);
            assert!(chunk * splits >= cap, "{rows} {cap}: {chunk} x {splits}");
            assert!(chunk * (splits - 1) < cap, "{rows} {cap}: an empty split");
            assert_eq!(chunk % SPLIT_CHUNK_STEP, 0);
            assert!(splits == 1 || chunk >= SPLIT_MIN_CHUNK);
            assert!(
                rows * groups * (splits - 1) < 2 * sms,
                "no more splits than fill the GPU"
            );
        }
        // a single 32K sequence spreads over the whole GPU; 64 sequences of 4K need few splits
        let (_, splits) = split_plan(1, 2, 32_768, 132);
        assert!(2 * splits >= 132, "{splits}");
        let (_, splits) = split_plan(64, 2, 4_352, 132);
        assert!(splits <= 3, "{splits}");
    }
}
