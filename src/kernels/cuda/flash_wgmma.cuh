// flash_wgmma: the paged prompt attention of flash_prefill on Hopper's warpgroup matrix
// instructions (wgmma, sm_90a; compiled when the PTX targets compute_90a, else the kernel traps and
// is never launched: see cuda.rs). head_dim 128, 16-bit. A block takes 128 query rows of one head
// in three warpgroups, specialized as FlashAttention-3's: a producer copies the query tile
// (cp.async) and then the key and value tiles (128 positions, found through the sequence's block
// table, copied by the tensor memory accelerator: one bulk tensor copy per 64-dimension half of
// the tile when its blocks follow each other in one slab, else per block and half, through the
// slab's tensor maps that kv_pool.rs encodes) into FW_STAGES stages
// of shared memory, each stage guarded by mbarriers (full: its bytes landed; empty: both consumers
// are done with it); two consumer warpgroups of 64 query rows each run the products and the
// softmax. Tiles are in the 128-byte swizzled layout the instructions read (and the copies
// write): row r's 16-byte chunk c at chunk c ^ (r % 8), each half of the 128 dimensions its own
// 128-row block. S = Q K^T reads both operands from shared memory (K-major); the online softmax
// runs on the accumulators in registers (float32, a row's 4 lanes together); the probabilities,
// rounded to 16 bits, are the register A operand of O += P V, V read as an N-major B (the
// transpose bit). Output token-major.
//
// The consumers keep the tensor cores busy while they run the softmax (the kernel was bound by
// instruction issue and by each warpgroup waiting for its own products, docs/benchmarks.md
// sessions 11-13): within a warpgroup, tile j's S = Q K^T is issued together with tile j-1's
// O += P V and the softmax of S runs while P V does; the two warpgroups interleave on their own
// (FlashAttention-3's turn-taking barriers measured 1% slower here). The softmax
// takes no mask tests on tiles without masked keys, one FMA + exp2 per score, and rescales O only
// when a row's max grew by more than 2^8 (softmax_rows in glm2.cu). setmaxnreg moves registers
// from the producer to the consumers. benches/flash_bench.cu times the kernel alone.

#define FW_TMA 1                             // takes the slabs' tensor maps (benches/flash_bench.cu)
constexpr int FW_BM = 128;                   // query rows per block
constexpr int FW_BN = 128;                   // keys per tile
constexpr int FW_D = 128;                    // head_dim
constexpr int FW_TILE = FW_BN * FW_D * 2;    // bytes of one tile (Q, a K or a V stage)
constexpr int FW_HALF = 128 * 128;           // bytes of one 64-dimension half of a tile

// Byte offset of 16-byte chunk c (0..15) of row r in a swizzled tile.
__device__ __forceinline__ uint32_t fw_off(int r, int c) {
    return (uint32_t)((c >> 3) * FW_HALF + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// Shared-memory matrix descriptor: start address, leading and stride byte offsets, 128-byte swizzle.
__device__ __forceinline__ uint64_t fw_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
           ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32) | ((uint64_t)1 << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Keeps the compiler from moving uses of accumulator registers across the asynchronous window.
__device__ __forceinline__ void wg_pin(float (&d)[64]) {
#pragma unroll
    for (int i = 0; i < 64; i++) asm volatile("" : "+f"(d[i])::"memory");
}

// d (64 x 128, float32) (+)= A (64 x 16, shared, K-major) * B (16 x 128 as 128 rows of 16, shared, K-major)
template <typename T> __device__ __forceinline__ void wgmma_ss(float (&d)[64], uint64_t da, uint64_t db, int accumulate);
template <> __device__ __forceinline__ void wgmma_ss<__nv_bfloat16>(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(accumulate));
}
template <> __device__ __forceinline__ void wgmma_ss<__half>(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(accumulate));
}
// d (+)= A (64 x 16, registers) * B (16 x 128, shared, N-major)
template <typename T> __device__ __forceinline__ void wgmma_rs(float (&d)[64], const uint32_t* a, uint64_t db, int accumulate);
template <> __device__ __forceinline__ void wgmma_rs<__nv_bfloat16>(float (&d)[64], const uint32_t* a, uint64_t db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));
}
template <> __device__ __forceinline__ void wgmma_rs<__half>(float (&d)[64], const uint32_t* a, uint64_t db, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));
}

// mbarriers (shared::cta) and the proxy fence of the warp-specialized kernel.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred p;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// The barrier's phase completes (for this thread) once its earlier cp.async copies have landed.
__device__ __forceinline__ void mbar_arrive_cp_async(uint32_t bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// The next phase of `bar` completes once `bytes` more have landed (and its other arrivals came).
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// A bulk tensor copy (TMA) of the box at (x, y) of the 2D tensor map at global address `map` to
// shared memory `dst`, completing its bytes on `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, uint64_t map, int x, int y, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"(map), "r"(x), "r"(y), "r"(bar)
        : "memory");
}
// Orders the host's copy of the tensor map at `map` (global memory) before this thread's bulk
// tensor copies through it (CUDA programming guide: a map written by cudaMemcpy, scope sys; the
// .gpu scope, a prefetch or no fence measured within 1%, docs/benchmarks.md session 13).
__device__ __forceinline__ void tensormap_acquire(uint64_t map) {
    asm volatile("fence.proxy.tensormap::generic.acquire.sys [%0], 128;\n" ::"l"(map) : "memory");
}
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

constexpr int FW_STAGES = 3;                                  // key and value tiles in flight
constexpr int FW_THREADS = 384;                               // a producer and two consumer warpgroups
constexpr int FW_SMEM = (1 + 2 * FW_STAGES) * FW_TILE + 1024;  // Q, the stages, 1024-byte alignment
constexpr int FW_PRODUCER_REGS = 56, FW_CONSUMER_REGS = 224;   // 128 x 56 + 256 x 224 <= 65536

template <typename T>
__device__ void flash_wgmma(const T* __restrict__ q, T* __restrict__ out, const SeqInfo& seq, uint64_t maps, int t,
                            int heads, int groups, float scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char fw_raw[];
    // full: a stage's copies landed (the producer's arrival with the bytes expected); empty: both consumer warpgroups are
    // done with it (256 arrivals); q: the query tile landed
    __shared__ __align__(8) uint64_t fw_bars[4 * FW_STAGES + 1];
    const uint32_t raw = (uint32_t)__cvta_generic_to_shared(fw_raw);
    unsigned char* base = fw_raw + ((1024 - (raw & 1023)) & 1023);  // the swizzle repeats every 1024 bytes
    const uint32_t aq = (uint32_t)__cvta_generic_to_shared(base);
    const uint32_t ak = aq + FW_TILE, av = aq + (1 + FW_STAGES) * FW_TILE;  // [FW_STAGES] each
    const uint32_t bars = (uint32_t)__cvta_generic_to_shared(fw_bars);
    auto full_k = [&](int st) { return bars + 8 * st; };
    auto full_v = [&](int st) { return bars + 8 * (FW_STAGES + st); };
    auto empty_k = [&](int st) { return bars + 8 * (2 * FW_STAGES + st); };
    auto empty_v = [&](int st) { return bars + 8 * (3 * FW_STAGES + st); };
    const uint32_t full_q = bars + 8 * 4 * FW_STAGES;
    const int past = seq.len, L = seq.len + t;
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y;  // the longest rows first
    const int g = h / (heads / groups);
    const int tid = threadIdx.x, wg = tid >> 7;
    const int q0 = qt * FW_BM;
    const int nkeys = min(past + min(q0 + FW_BM, t), L);  // keys the block's last row sees
    const int ntiles = (nkeys + FW_BN - 1) / FW_BN;
    if (tid == 0) {
        for (int st = 0; st < FW_STAGES; st++) {
            mbar_init(full_k(st), 1);
            mbar_init(full_v(st), 1);
            mbar_init(empty_k(st), 256);
            mbar_init(empty_v(st), 256);
        }
        mbar_init(full_q, 128);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        // Producer: the query tile (cp.async, all 128 threads), then the first warp issues each
        // key and value tile as bulk tensor copies (TMA) into its stage once both consumer
        // warpgroups released it, one copy per 64-dimension half of a box, through the slab's
        // tensor maps (`maps`: per slab and layer four maps of 128 bytes: key and value in boxes
        // of min(block_size, 128) positions, then key and value in boxes of 128; 128-byte swizzle,
        // the layout the products read).
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(FW_PRODUCER_REGS));
        const T* qb = q + (size_t)h * t * FW_D;
        for (int i = tid; i < FW_BM * 16; i += 128) {
            const int r = i >> 4, row = q0 + r;
            cp_async16(base + fw_off(r, i & 15), qb + (size_t)min(row, t - 1) * FW_D + (i & 15) * 8, row < t);
        }
        mbar_arrive_cp_async(full_q);
        if (tid < 32) {
            // lane i < nb looks up block i of each tile; a tile whose blocks (up to the last key)
            // follow each other in one slab, the common case of a long prompt (the pool hands out
            // its lowest free block first), is one 128-position box per half, issued by lane 0;
            // otherwise lane i copies block i as its own box
            const int lane = tid;
            const uint32_t* table = reinterpret_cast<const uint32_t*>(seq.blocks);
            const uint32_t in_block = (1u << seq.shift) - 1u, in_slab = (1u << seq.slab_shift) - 1u;
            const int lbox = min(seq.shift, 7), nb = FW_BN >> lbox;  // blocks of 2^lbox positions per tile
            const int x0 = g * FW_D;
            uint64_t fenced = 0;
            uint32_t last = 0xffffffffu;
            // the maps were written by copies from the host: each lane acquires a slab's four
            // maps before its first copy through them (slabs 0..63 remembered, others whenever
            // the slab changes)
            auto acquire = [&](uint32_t slab) {
                if (slab != last && !(slab < 64 && ((fenced >> slab) & 1))) {
#pragma unroll
                    for (int j = 0; j < 4; j++) tensormap_acquire(maps + (uint64_t)slab * 512 + 128 * j);
                    if (slab < 64) fenced |= 1ull << slab;
                }
                last = slab;
            };
            for (int tile = 0; tile < ntiles; tile++) {
                const int st = tile % FW_STAGES;
                const uint32_t par = ((tile / FW_STAGES) & 1) ^ 1;
                const uint32_t dk = ak + st * FW_TILE, dv = av + st * FW_TILE;
                // this lane's block: its first position (a block past the last key: the last key's
                // block, finite values; those keys are masked), its row in its slab
                const int p0 = tile * FW_BN + (min(lane, nb - 1) << lbox);
                const uint32_t p = (uint32_t)min(p0, L - 1) >> lbox << lbox;
                const uint32_t blk = table[p >> seq.shift], slab = blk >> seq.slab_shift;
                const int row = (int)(((blk & in_slab) << seq.shift) + (p & in_block));
                const uint32_t blk0 = __shfl_sync(0xffffffffu, blk, 0);
                const bool whole = __all_sync(0xffffffffu, lane >= nb || p0 >= L ||
                                                               (blk == blk0 + lane && slab == (blk0 >> seq.slab_shift)));
                const bool issues = whole ? lane == 0 : lane < nb;
                const int at = whole ? 0 : (lane << lbox) * 128;  // bytes into each half of the stage
                const uint64_t km = maps + (uint64_t)slab * 512 + (whole ? 256 : 0);  // key map; the value map follows
                if (issues) acquire(slab);
                // once both consumers released the stage: its bytes expected, both halves copied
                auto copy = [&](uint32_t dst, uint64_t map, uint32_t full, uint32_t empty) {
                    mbar_wait(empty, par);
                    if (lane == 0) mbar_expect_tx(full, FW_TILE);
                    __syncwarp();
                    if (issues) {
                        tma_load_2d(dst + at, map, x0, row, full);
                        tma_load_2d(dst + FW_HALF + at, map, x0 + 64, row, full);
                    }
                };
                copy(dk, km, full_k(st), empty_k(st));
                copy(dv, km + 128, full_v(st), empty_v(st));
            }
        }
        cp_async_wait<0>();
        return;
    }

    // Consumers: warpgroup cw takes query rows q0 + 64 cw ... Within a warpgroup tile j's
    // S = Q K^T is issued together with tile j-1's O += P V, and the softmax of S runs while P V
    // does (FlashAttention-3's overlap); the two warpgroups interleave on their own.
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(FW_CONSUMER_REGS));
    const int cw = wg - 1, warp = (tid >> 5) & 3, lane = tid & 31;
    const int gr = lane >> 2, tq = lane & 3;
    const int wrow = q0 + cw * 64 + warp * 16;  // the warp's first query row
    const float sl2 = scale * 1.4426950408889634f;  // scores in log2 units: exp2
    auto issue_s = [&](float (&s)[64], int st) {
        wg_pin(s);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            const uint32_t off = (kk >> 2) * FW_HALF + (kk & 3) * 32;
            wgmma_ss<T>(s, fw_desc(aq + cw * 64 * 128 + off, 16, 1024), fw_desc(ak + st * FW_TILE + off, 16, 1024), kk > 0);
        }
        wg_commit();
    };
    // O += P V: V N-major (its rows are keys, dimensions contiguous): leading offset = the other
    // 64-dimension half, stride offset = the next 8 keys; 16 keys = 2048 bytes on
    auto issue_pv = [&](float (&o)[64], const uint32_t (&pa)[32], int st) {
        wg_pin(o);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 8; kk++) wgmma_rs<T>(o, pa + 4 * kk, fw_desc(av + st * FW_TILE + kk * 2048, FW_HALF, 1024), 1);
        wg_commit();
    };
    // P (16-bit) as the A operand of 8 steps of 16 keys: the accumulator layout of two 8-key
    // column blocks is the A fragment of 16 keys
    auto to_p = [&](const float (&s)[64], uint32_t (&pa)[32]) {
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            pa[4 * kk + 0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
            pa[4 * kk + 1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
            pa[4 * kk + 2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
            pa[4 * kk + 3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
        }
    };
    // masks only on the tiles that reach past a row's position or L
    auto edge = [&](int k0) { return k0 + FW_BN - 1 > past + wrow || k0 + FW_BN > L; };
    float o[64], s[64];
    uint32_t pa[32];
#pragma unroll
    for (int i = 0; i < 64; i++) o[i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, alphas[2];
    mbar_wait(full_q, 0);
    fence_async_shared();  // the query tile came by cp.async (the key and value tiles by TMA need none)
    // tile 0: S alone
    mbar_wait(full_k(0), 0);
    issue_s(s, 0);
    wg_wait0();
    wg_pin(s);
    mbar_arrive(empty_k(0));
    if (edge(0))
        softmax_rows<16, true, true, true>(s, m, l, alphas, sl2, 0, past + wrow + gr, L, tq);
    else
        softmax_rows<16, true, false, true>(s, m, l, alphas, sl2, 0, past + wrow + gr, L, tq);
    to_p(s, pa);
    for (int tile = 1; tile < ntiles; tile++) {
        const int st = tile % FW_STAGES, pst = (tile - 1) % FW_STAGES;
        mbar_wait(full_k(st), (tile / FW_STAGES) & 1);
        mbar_wait(full_v(pst), ((tile - 1) / FW_STAGES) & 1);
        issue_s(s, st);
        issue_pv(o, pa, pst);
        asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");  // S landed, P V may run on
        wg_pin(s);
        mbar_arrive(empty_k(st));
        const int k0 = tile * FW_BN;
        if (edge(k0))
            softmax_rows<16, true, true, true>(s, m, l, alphas, sl2, k0, past + wrow + gr, L, tq);
        else
            softmax_rows<16, true, false, true>(s, m, l, alphas, sl2, k0, past + wrow + gr, L, tq);
        wg_wait0();
        wg_pin(o);
        mbar_arrive(empty_v(pst));
        rescale_o<16, true>(o, alphas);
        to_p(s, pa);
    }
    {
        const int pst = (ntiles - 1) % FW_STAGES;
        mbar_wait(full_v(pst), ((ntiles - 1) / FW_STAGES) & 1);
        issue_pv(o, pa, pst);
        wg_wait0();
        wg_pin(o);
        mbar_arrive(empty_v(pst));
    }
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        const int row = wrow + gr + 8 * rr;
        if (row >= t) continue;
        const float inv = 1.f / l[rr];
        T* orow = out + ((size_t)row * heads + h) * FW_D;
#pragma unroll
        for (int j = 0; j < 16; j++)
            *reinterpret_cast<uint32_t*>(orow + 8 * j + 2 * tq) = pack2<T>(o[4 * j + 2 * rr] * inv, o[4 * j + 2 * rr + 1] * inv);
    }
#else
    __trap();  // built without sm_90a: never launched (the launcher checks)
#endif
}

#define FLASH_WGMMA(T, NAME)                                                                              \
    extern "C" __global__ void __launch_bounds__(FW_THREADS, 1) flash_wgmma_##NAME##_d128(                          \
        const T* q, T* out, const __grid_constant__ SeqInfo seq, uint64_t maps, int t, int heads, int groups, float scale) { \
        flash_wgmma<T>(q, out, seq, maps, t, heads, groups, scale);                                            \
    }
FLASH_WGMMA(__nv_bfloat16, bf16) FLASH_WGMMA(__half, f16)
