// flash_wgmma: the paged prompt attention of flash_prefill on Hopper's warpgroup matrix
// instructions (wgmma, sm_90a; compiled when the PTX targets compute_90a, else the kernel traps and
// is never launched: see cuda.rs). head_dim 128, 16-bit. A block takes 128 query rows of one head,
// two warpgroups of 64; the key and value tiles (128 positions, read through the sequence's block
// table) go through shared memory in two stages (cp.async, the next tile copied while the current
// one is used), in the 128-byte swizzled layout the instructions read: row r's 16-byte chunk c at
// chunk c ^ (r % 8), each half of the 128 dimensions its own 128-row block. S = Q K^T reads both
// operands from shared memory (K-major); the online softmax runs on the accumulators in registers
// (float32, a row's 4 lanes together); the probabilities, rounded to 16 bits, are the register A
// operand of O += P V, V read as an N-major B (the transpose bit). Output token-major.
//
// The kernel is bound by instruction issue (8 warps per SM, each running its tile's softmax and
// copies in sequence; Nsight Compute: ~42% issue slots busy, 2.5x cuDNN's instructions per FLOP in
// the first version). Hence: the next tile's copies are issued after S's wgmma (the tensor cores
// work meanwhile) with 32-bit offsets and all block-table reads up front; the softmax takes no mask
// tests on tiles without masked keys, one FMA + exp2 per score, and rescales O only when a row's
// max grew by more than 2^8 (online_softmax in glm2.cu). benches/flash_bench.cu times it alone.

constexpr int FW_BM = 128;                   // query rows per block
constexpr int FW_BN = 128;                   // keys per tile
constexpr int FW_D = 128;                    // head_dim
constexpr int FW_TILE = FW_BN * FW_D * 2;    // bytes of one tile (Q, a K or a V stage)
constexpr int FW_HALF = 128 * 128;           // bytes of one 64-dimension half of a tile
constexpr int FW_SMEM = 5 * FW_TILE + 1024;  // Q, two K and two V stages, 1024-byte alignment

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

template <typename T>
__device__ void flash_wgmma(const T* __restrict__ q, T* __restrict__ out, const SeqInfo& seq, int t, int heads,
                            int groups, float scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ __align__(1024) unsigned char fw_raw[];
    const uint32_t raw = (uint32_t)__cvta_generic_to_shared(fw_raw);
    unsigned char* base = fw_raw + ((1024 - (raw & 1023)) & 1023);  // the swizzle repeats every 1024 bytes
    unsigned char* sq = base;
    unsigned char* sk = base + FW_TILE;      // [2 stages]
    unsigned char* sv = base + 3 * FW_TILE;  // [2 stages]
    const uint32_t aq = (uint32_t)__cvta_generic_to_shared(sq);
    const uint32_t ak = aq + FW_TILE, av = aq + 3 * FW_TILE;
    const int past = seq.len, L = seq.len + t;
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y;  // the longest rows first
    const int g = h / (heads / groups);
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int gr = lane >> 2, tq = lane & 3;
    const int q0 = qt * FW_BM;
    const int nkeys = min(past + min(q0 + FW_BM, t), L);  // keys the block's last row sees
    const int ntiles = (nkeys + FW_BN - 1) / FW_BN;
    const T* qb = q + (size_t)h * t * FW_D;
    for (int i = tid; i < FW_BM * 16; i += 256) {
        const int r = i >> 4, c = i & 15, row = q0 + r;
        cp_async16(sq + fw_off(r, c), qb + (size_t)min(row, t - 1) * FW_D + c * 8, row < t);
    }
    // One key and one value tile into `stage`: each thread copies 16-byte chunk tid % 16 of rows
    // tid / 16 + 16 i. The block-table reads of all 8 rows come first, independent of each other
    // (one round trip, not one per row pair). Offsets within a slab in 32 bits (a slab is at most
    // SLAB_BYTES of kv_pool.rs over all layers).
    const uint32_t* table = reinterpret_cast<const uint32_t*>(seq.blocks);
    const uint64_t* kslab = reinterpret_cast<const uint64_t*>(seq.k);
    const uint64_t* vslab = reinterpret_cast<const uint64_t*>(seq.v);
    const uint32_t in_block = (1u << seq.shift) - 1u, in_slab = (1u << seq.slab_shift) - 1u;
    const uint32_t r0 = tid >> 4, chunk = (uint32_t)(g * FW_D + (tid & 15) * 8), row_elems = (uint32_t)(groups * FW_D);
    const uint32_t soff = fw_off(r0, tid & 15);  // + 16 i rows = + 2048 i bytes
    auto load = [&](int tile, int stage) {
        const int k0 = tile * FW_BN;
        unsigned char* ks = sk + stage * FW_TILE + soff;
        unsigned char* vs = sv + stage * FW_TILE + soff;
        uint32_t blk[8];
#pragma unroll
        for (int i = 0; i < 8; i++) blk[i] = table[(uint32_t)min(k0 + (int)r0 + 16 * i, L - 1) >> seq.shift];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const int p = k0 + (int)r0 + 16 * i;
            // as kv_at: (block in slab, position in block) x groups + g, in the block's slab
            const uint32_t row = ((blk[i] & in_slab) << seq.shift) + ((uint32_t)min(p, L - 1) & in_block);
            const uint32_t off = row * row_elems + chunk;
            cp_async16(ks + 2048 * i, reinterpret_cast<const T*>(kslab[blk[i] >> seq.slab_shift]) + off, p < L);
            cp_async16(vs + 2048 * i, reinterpret_cast<const T*>(vslab[blk[i] >> seq.slab_shift]) + off, p < L);
        }
    };
    load(0, 0);
    cp_async_commit();
    float o[64], s[64];
#pragma unroll
    for (int i = 0; i < 64; i++) o[i] = s[i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const float sl2 = scale * 1.4426950408889634f;  // scores in log2 units: exp2
    const int wrow = q0 + wg * 64 + warp * 16;       // the warp's first query row
    for (int tile = 0; tile < ntiles; tile++) {
        const int stage = tile & 1;
        cp_async_wait<0>();
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // copies seen by the tensor cores
        __syncthreads();  // this tile is in; every warpgroup is done with the other stage
        // S = Q K^T (this warpgroup's 64 rows x 128 keys), 8 steps of 16 dimensions
        wg_pin(s);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            const uint32_t off = (kk >> 2) * FW_HALF + (kk & 3) * 32;
            wgmma_ss<T>(s, fw_desc(aq + wg * 64 * 128 + off, 16, 1024),
                        fw_desc(ak + stage * FW_TILE + off, 16, 1024), kk > 0);
        }
        wg_commit();
        // the next tile's copies issued while the tensor cores work on this one's S
        if (tile + 1 < ntiles) load(tile + 1, stage ^ 1);
        cp_async_commit();
        wg_wait0();
        wg_pin(s);
        // online softmax (log2 units), masks only on the tiles that reach past a row's position or L
        const int k0 = tile * FW_BN;
        const bool edge = k0 + FW_BN - 1 > past + wrow || k0 + FW_BN > L;
        online_softmax<16, 16, true, true>(s, o, m, l, sl2, edge, k0, past + wrow + gr, L, tq);
        // P (16-bit) as the A operand of 8 steps of 16 keys: the accumulator layout of two
        // 8-key column blocks is the A fragment of 16 keys
        uint32_t pa[32];
#pragma unroll
        for (int kk = 0; kk < 8; kk++) {
            pa[4 * kk + 0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
            pa[4 * kk + 1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
            pa[4 * kk + 2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
            pa[4 * kk + 3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
        }
        // O += P V: V N-major (its rows are keys, dimensions contiguous): leading offset = the
        // other 64-dimension half, stride offset = the next 8 keys; 16 keys = 2048 bytes on
        wg_pin(o);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 8; kk++)
            wgmma_rs<T>(o, pa + 4 * kk, fw_desc(av + stage * FW_TILE + kk * 2048, FW_HALF, 1024), 1);
        wg_commit();
        wg_wait0();
        wg_pin(o);
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
    extern "C" __global__ void __launch_bounds__(256, 1) flash_wgmma_##NAME##_d128(                          \
        const T* q, T* out, const __grid_constant__ SeqInfo seq, int t, int heads, int groups, float scale) { \
        flash_wgmma<T>(q, out, seq, t, heads, groups, scale);                                                 \
    }
FLASH_WGMMA(__nv_bfloat16, bf16) FLASH_WGMMA(__half, f16)
