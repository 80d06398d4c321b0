// Flash-decoding: the decode attention of long sequences split over many thread blocks
// (included by glm2.cu, after SeqInfo / SeqTable / to_f / from_f).
//
// decode_split: grid (sequences, groups, splits), FD_WARPS warps. A block takes one KV group of one
//   sequence and one chunk of its positions, and all the query heads of that group (multi-query
//   attention: ChatGLM2's 32 heads share 2 groups), so each key and value is read once per group,
//   not once per head. It first does what the one-block kernel does with the new token (bias,
//   rotary, rounding to T; the block whose chunk holds position `len` stores the new key and
//   value), then, in the CUDA-core kernel (float32), each warp walks tiles of FD_TILE positions:
//   lanes hold head_dim / 32 dimensions of all the group's queries in registers; the per-head dot products of a position are summed
//   across the warp by a transposing reduction (16 shuffles for 16 heads instead of 80), after
//   which lane 2h holds head h's score; the online-softmax weights go through shared memory to
//   every lane, which accumulates its dimensions of the values for all heads. The warps of a block
//   are combined in shared memory; with one split the block writes the output, with several it
//   writes (max, sum, unnormalised accumulator) per head for decode_reduce.
// decode_split_mma: the same blocks for 16-bit caches on tensor cores (see above the kernel).
// decode_reduce: grid (sequences, heads): combines a head's splits into the output.
// Chunks are cut from each sequence's runtime length (fd_chunk), so the grid fixed by a captured
// CUDA graph keeps every split busy as the cache fills.
//
// Numerics are those of decode_attention: q, k, v rounded to T as stored, scores, softmax and
// accumulation in float32, the output rounded to T; the tensor-core kernel also rounds the
// softmax weights to T before the value product (tests/cuda_decode.rs bounds the difference).

constexpr int FD_WARPS = 4;   // warps per block
constexpr int FD_R = 16;      // query heads per KV group handled (heads / groups <= FD_R)
constexpr int FD_TILE = 8;    // positions per warp step
constexpr int FD_MAXD = 128;  // head_dim <= 32 * E <= FD_MAXD

// v[h] summed over the warp, for 16 values per lane: afterwards lanes 2h and 2h+1 hold head h's sum.
__device__ __forceinline__ float warp_sum16(float (&v)[FD_R], int lane) {
#pragma unroll
    for (int step = 0; step < 4; step++) {
        const int half = 8 >> step;
        const int off = 16 >> step;
        const bool up = (lane & off) != 0;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            if (i < half) {
                const float send = up ? v[i] : v[i + half];
                const float keep = up ? v[i + half] : v[i];
                v[i] = keep + __shfl_xor_sync(0xffffffff, send, off);
            }
        }
    }
    return v[0] + __shfl_xor_sync(0xffffffff, v[0], 1);
}

// E consecutive elements as floats (one vector load where it is a whole 4- or 8-byte word).
template <typename T, int E>
__device__ __forceinline__ void load_e(const T* p, float (&o)[E]) {
    if constexpr (sizeof(T) == 2 && E == 4) {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
        for (int j = 0; j < 4; j++) o[j] = to_f(h[j]);
    } else if constexpr (sizeof(T) == 2 && E == 2) {
        const uint32_t u = *reinterpret_cast<const uint32_t*>(p);
        const T* h = reinterpret_cast<const T*>(&u);
        o[0] = to_f(h[0]);
        o[1] = to_f(h[1]);
    } else {
#pragma unroll
        for (int j = 0; j < E; j++) o[j] = to_f(p[j]);
    }
}

template <typename T>
__device__ __forceinline__ float biased(const T* __restrict__ row, const T* __restrict__ bias, int i) {
    return to_f(from_f<T>(to_f(row[i]) + (bias ? to_f(bias[i]) : 0.f)));
}

// Positions per split of a sequence holding n entries: the same for the split and the reduce
// kernels, from the runtime length (so every split of a captured graph has work as the cache
// fills), at least min_chunk, a multiple of 32.
__device__ __forceinline__ int fd_chunk(int n, int splits, int min_chunk) {
    const int c = ((n + splits - 1) / splits + 31) / 32 * 32;
    return max(c, min_chunk);
}

// Shared memory of a split block.
struct FdShared {
    float q[FD_R][FD_MAXD];
    float k[FD_MAXD];
    float v[FD_MAXD];
    float w[FD_WARPS][FD_TILE][FD_R];
    float c[FD_WARPS][FD_R];
    float m[FD_WARPS][FD_R];
    float l[FD_WARPS][FD_R];
    float acc[FD_WARPS][FD_R][FD_MAXD];
};

// The group's queries, key and value of the new token into sh.q / sh.k / sh.v (zero padded to
// FD_R x FD_MAXD): first the raw values (bias added, rounded to T) and the rotary row, staged in
// sh.acc (unused until the end) with all loads of a thread issued together, then the rotation
// from shared memory (a loop doing both waits for its global loads one element at a time). The
// block whose chunk holds position `len` then stores the new key and value in the cache.
template <typename T>
__device__ void fd_prologue(FdShared& sh, const T* __restrict__ row, const T* __restrict__ bias,
                            const T* __restrict__ cos_t, const T* __restrict__ sin_t, const SeqInfo& info,
                            bool holds_new, int g, int r, int heads, int groups,
                            int head_dim, int rot_half) {
    float* x_s = &sh.acc[0][0][0];             // [(r + 2) * head_dim]
    float* cs_s = x_s + (FD_R + 2) * FD_MAXD;  // cos [rot_half], then sin [rot_half]
    const int nq = r * head_dim;
    const int nx = nq + 2 * head_dim;
#pragma unroll
    for (int k = 0; k < (FD_R + 2) * FD_MAXD / (FD_WARPS * 32); k++) {  // every load in flight at once
        const int i = threadIdx.x + k * FD_WARPS * 32;
        if (i < nx) {
            const int src = i < nq ? g * nq + i
                            : i < nq + head_dim ? (heads + g) * head_dim + (i - nq)
                                                : (heads + groups + g) * head_dim + (i - nq - head_dim);
            x_s[i] = biased<T>(row, bias, src);
        }
    }
    for (int i = threadIdx.x; i < 2 * rot_half; i += blockDim.x)
        cs_s[i] = to_f(i < rot_half ? cos_t[(size_t)info.rot * rot_half + i]
                                    : sin_t[(size_t)info.rot * rot_half + i - rot_half]);
    for (int i = threadIdx.x; i < FD_R * FD_MAXD; i += blockDim.x) sh.q[i / FD_MAXD][i % FD_MAXD] = 0.f;
    for (int i = threadIdx.x; i < FD_MAXD; i += blockDim.x) {
        sh.k[i] = 0.f;
        sh.v[i] = 0.f;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nx; i += blockDim.x) {
        const int which = i / head_dim, e = i % head_dim;  // which < r: a query head; r: key; r + 1: value
        float x = x_s[i];
        if (which <= r && e < 2 * rot_half) {
            const float xp = x_s[i ^ 1];  // the other element of the pair (head_dim is even)
            const float cc = cs_s[e / 2];
            const float sn = cs_s[rot_half + e / 2];
            x = (e & 1) == 0 ? x * cc - xp * sn : xp * sn + x * cc;
        }
        x = to_f(from_f<T>(x));
        if (which < r)
            sh.q[which][e] = x;
        else if (which == r)
            sh.k[e] = x;
        else
            sh.v[e] = x;
    }
    __syncthreads();
    if (holds_new) {
        T* kn = kv_at<T>(info.k, info, info.len, g, groups, head_dim);
        T* vn = kv_at<T>(info.v, info, info.len, g, groups, head_dim);
        for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
            kn[e] = from_f<T>(sh.k[e]);
            vn[e] = from_f<T>(sh.v[e]);
        }
    }
    __syncthreads();  // the new entry is visible to the whole block before anyone reads it
}

// The block's warps combined (sh.m / sh.l / sh.acc hold each warp's max, sum and unnormalised
// accumulator per head, max -INFINITY for a warp that saw no position): with one split the
// output, with several the split's (max, sum, accumulator) per head for decode_reduce.
template <typename T>
__device__ void fd_combine(FdShared& sh, const SeqInfo& info, T* __restrict__ out, float* __restrict__ part,
                           int s, int g, int c, int r, int heads, int head_dim, int splits) {
    __syncthreads();
    for (int i = threadIdx.x; i < r * head_dim; i += blockDim.x) {
        const int h = i / head_dim, e = i % head_dim;
        float mg = -INFINITY;
#pragma unroll
        for (int wi = 0; wi < FD_WARPS; wi++) mg = fmaxf(mg, sh.m[wi][h]);
        float num = 0.f, den = 0.f;
#pragma unroll
        for (int wi = 0; wi < FD_WARPS; wi++) {
            if (sh.m[wi][h] == -INFINITY) continue;
            const float f = __expf(sh.m[wi][h] - mg);
            num += sh.acc[wi][h][e] * f;
            den += sh.l[wi][h] * f;
        }
        const int head = g * r + h;
        if (splits == 1) {
            out[(size_t)info.row * heads * head_dim + (size_t)head * head_dim + e] = from_f<T>(num / den);
        } else {
            float* pp = part + (((size_t)s * heads + head) * splits + c) * (head_dim + 2);
            pp[2 + e] = num;
            if (e == 0) {
                pp[0] = mg;
                pp[1] = den;
            }
        }
    }
}

// part: [rows, heads, splits, 2 + head_dim] float32 (max, sum, accumulator); unused with one split.
// CUDA cores, any float type: lanes hold E dimensions of all the group's queries.
template <typename T, int E>
__device__ void decode_split(const T* __restrict__ qkv, const T* __restrict__ bias,
                             const SeqInfo* __restrict__ seqs, const T* __restrict__ cos_t,
                             const T* __restrict__ sin_t, T* __restrict__ out, float* __restrict__ part,
                             int heads, int groups, int head_dim, int rot_half, float scale, int min_chunk,
                             int splits) {
    const int s = blockIdx.x, g = blockIdx.y, c = blockIdx.z;
    const SeqInfo info = seqs[s];
    const int n = info.len + 1;
    const int chunk = fd_chunk(n, splits, min_chunk);
    const int p0 = c * chunk;
    if (p0 >= n) return;
    const int p1 = min(n, p0 + chunk);
    const int r = heads / groups;
    const T* row = qkv + (size_t)info.row * (heads + 2 * groups) * head_dim;
    __shared__ FdShared sh;
    fd_prologue<T>(sh, row, bias, cos_t, sin_t, info, p0 <= info.len && info.len < p1, g, r, heads, groups,
                   head_dim, rot_half);
    const size_t stride = (size_t)groups * head_dim;  // between positions of one block

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int d0 = lane * E;          // this lane's first dimension
    const bool dims = d0 < head_dim;  // head_dim % E == 0: a lane has all E or none
    float q[FD_R][E], acc[FD_R][E];
#pragma unroll
    for (int h = 0; h < FD_R; h++)
#pragma unroll
        for (int j = 0; j < E; j++) {
            q[h][j] = sh.q[h][d0 + j];
            acc[h][j] = 0.f;
        }
    float m = -INFINITY, l = 0.f;  // of head lane >> 1

    for (int t0 = p0 + warp * FD_TILE; t0 < p1; t0 += FD_WARPS * FD_TILE) {
        float kv[FD_TILE][E], vv[FD_TILE][E];
        // a tile lies in one block (tiles start at multiples of FD_TILE, blocks hold 16 or more)
        const T* kt = kv_at<T>(info.k, info, t0, g, groups, head_dim);
        const T* vt = kv_at<T>(info.v, info, t0, g, groups, head_dim);
#pragma unroll
        for (int t = 0; t < FD_TILE; t++) {
            const int p = t0 + t;
            if (p < p1 && dims && p != info.len) {
                load_e<T, E>(kt + t * stride + d0, kv[t]);
                load_e<T, E>(vt + t * stride + d0, vv[t]);
            } else {
#pragma unroll
                for (int j = 0; j < E; j++) {
                    const bool now = p < p1 && dims;  // p == len: the new token, from shared memory
                    kv[t][j] = now ? sh.k[d0 + j] : 0.f;
                    vv[t][j] = now ? sh.v[d0 + j] : 0.f;
                }
            }
        }
        float sc[FD_TILE];
#pragma unroll
        for (int t = 0; t < FD_TILE; t++) {
            float d[FD_R];
#pragma unroll
            for (int h = 0; h < FD_R; h++) {
                float a = 0.f;
#pragma unroll
                for (int j = 0; j < E; j++) a += q[h][j] * kv[t][j];
                d[h] = a;
            }
            const float dot = warp_sum16(d, lane);
            sc[t] = t0 + t < p1 ? dot * scale : -INFINITY;
        }
        float mt = m;
#pragma unroll
        for (int t = 0; t < FD_TILE; t++) mt = fmaxf(mt, sc[t]);
        const float corr = __expf(m - mt);
        float w[FD_TILE], ws = 0.f;
#pragma unroll
        for (int t = 0; t < FD_TILE; t++) {
            w[t] = __expf(sc[t] - mt);
            ws += w[t];
        }
        l = l * corr + ws;
        m = mt;
        if ((lane & 1) == 0) {
            sh.c[warp][lane >> 1] = corr;
#pragma unroll
            for (int t = 0; t < FD_TILE; t++) sh.w[warp][t][lane >> 1] = w[t];
        }
        __syncwarp();
#pragma unroll
        for (int h = 0; h < FD_R; h++) {
            const float ch = sh.c[warp][h];
#pragma unroll
            for (int j = 0; j < E; j++) acc[h][j] *= ch;
#pragma unroll
            for (int t = 0; t < FD_TILE; t++) {
                const float wt = sh.w[warp][t][h];
#pragma unroll
                for (int j = 0; j < E; j++) acc[h][j] += wt * vv[t][j];
            }
        }
        __syncwarp();
    }
    __syncthreads();  // sh.acc held the prologue's staging
    if ((lane & 1) == 0) {
        sh.m[warp][lane >> 1] = m;
        sh.l[warp][lane >> 1] = l;
    }
#pragma unroll
    for (int h = 0; h < FD_R; h++)
#pragma unroll
        for (int j = 0; j < E; j++) sh.acc[warp][h][d0 + j] = acc[h][j];
    fd_combine<T>(sh, info, out, part, s, g, c, r, heads, head_dim, splits);
}

// Tensor cores, 16-bit T: the group's (up to) 16 query heads are the 16 rows of
// mma.m16n8k16. Each warp takes 16 positions at a time: S = Q K^T as 2 x (head_dim / 16) MMAs
// (keys read straight from the cache as the B operand, 16 bytes per load; values the same,
// transposed in registers by movmatrix), the online softmax on the accumulator fragments (a row's 4 lanes combine with 2
// shuffles), then O += P V with P re-used in registers as the A operand (rounded to T, as
// FlashAttention does) and V as B, one MMA per 8 output dimensions. head_dim % 16 == 0, <= 128.
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __nv_bfloat16*) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, __half*) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
// The 8 x 8 matrix of 16-bit elements held one word per lane (row lane / 4, columns 2 (lane % 4),
// + 1), transposed.
__device__ __forceinline__ uint32_t movtrans(uint32_t a) {
    uint32_t d;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
    return d;
}

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                         __nv_bfloat16*) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                         __half*) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

constexpr int FD_KS = FD_MAXD / 16;  // k-steps of 16 dimensions
constexpr int FD_NT = FD_MAXD / 8;   // output tiles of 8 dimensions

template <typename T>
__device__ void decode_split_mma(const T* __restrict__ qkv, const T* __restrict__ bias,
                                 const SeqInfo* __restrict__ seqs, const T* __restrict__ cos_t,
                                 const T* __restrict__ sin_t, T* __restrict__ out, float* __restrict__ part,
                                 int heads, int groups, int head_dim, int rot_half, float scale,
                                 int min_chunk, int splits) {
    const int s = blockIdx.x, g = blockIdx.y, c = blockIdx.z;
    const SeqInfo info = seqs[s];
    const int n = info.len + 1;
    const int chunk = fd_chunk(n, splits, min_chunk);
    const int p0 = c * chunk;
    if (p0 >= n) return;
    const int p1 = min(n, p0 + chunk);
    const int r = heads / groups;
    const T* row = qkv + (size_t)info.row * (heads + 2 * groups) * head_dim;
    __shared__ FdShared sh;
    // (plain loads, not the read-only path: this block has just written position len)
    fd_prologue<T>(sh, row, bias, cos_t, sin_t, info, p0 <= info.len && info.len < p1, g, r, heads, groups,
                   head_dim, rot_half);
    const size_t stride = (size_t)groups * head_dim;  // between positions of one block

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    // Dimensions are read 16 bytes at a time: lane (gid, tig) loads, for the positions gid and
    // gid + 8 of a tile, the 8 dimensions 32 q + 8 tig .. + 7 (q < 4) as a uint4 of 4 words. The
    // contraction over dimensions of QK^T may take them in any order applied to Q and K alike:
    // word w of uint4 q is k-step 2 q + (w >> 1), half w & 1 of the B fragment (the Q fragments
    // below gather the same dimensions). V's B fragment wants two consecutive positions of one
    // dimension: the words of positions gid (gid + 8) form 8 x 8 matrices (rows: positions,
    // columns: dimension pairs) that movmatrix.trans turns into it, output tile 4 q + w holding
    // the dimensions 32 q + 2 w + 8 tig, + 1 in the lanes' accumulator columns 2 tig, 2 tig + 1.
    const int nq = (head_dim + 31) / 32;  // 32-dimension blocks (the last may be partial)
    const bool dim_ok[4] = {8 * tig < head_dim, 32 + 8 * tig < head_dim, 64 + 8 * tig < head_dim,
                            96 + 8 * tig < head_dim};
    // Q as A fragments (rows gid and gid + 8), k-step ks = 2 q + hi: halves 0/1 are the words
    // 2 hi and 2 hi + 1 of uint4 q
    uint32_t qa[FD_KS][4];
#pragma unroll
    for (int ks = 0; ks < FD_KS; ks++) {
        const int c0 = 32 * (ks >> 1) + 8 * tig + 4 * (ks & 1);  // word 2 (ks & 1): dims c0, c0 + 1
        qa[ks][0] = pack2(sh.q[gid][c0], sh.q[gid][c0 + 1], (T*)nullptr);
        qa[ks][1] = pack2(sh.q[gid + 8][c0], sh.q[gid + 8][c0 + 1], (T*)nullptr);
        qa[ks][2] = pack2(sh.q[gid][c0 + 2], sh.q[gid][c0 + 3], (T*)nullptr);
        qa[ks][3] = pack2(sh.q[gid + 8][c0 + 2], sh.q[gid + 8][c0 + 3], (T*)nullptr);
    }
    float o[FD_NT][4];
#pragma unroll
    for (int i = 0; i < FD_NT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows gid, gid + 8 (l: this lane's part)

    for (int t0 = p0 + warp * 16; t0 < p1; t0 += FD_WARPS * 16) {
        // every key and value word of the tile requested before any is used (two round trips
        // to memory per tile would be the loop's latency)
        uint4 kr[2][4], vr[2][4];
        // a tile of 16 positions lies in one block (tiles start at multiples of 16)
        const T* kt = kv_at<T>(info.k, info, t0, g, groups, head_dim);
        const T* vt = kv_at<T>(info.v, info, t0, g, groups, head_dim);
#pragma unroll
        for (int hh = 0; hh < 2; hh++) {
            const bool ok = t0 + 8 * hh + gid < p1;
            const size_t off = (size_t)(8 * hh + gid) * stride + 8 * tig;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const bool in = ok && dim_ok[q];
                kr[hh][q] = in ? *reinterpret_cast<const uint4*>(kt + off + 32 * q) : make_uint4(0, 0, 0, 0);
                vr[hh][q] = in ? *reinterpret_cast<const uint4*>(vt + off + 32 * q) : make_uint4(0, 0, 0, 0);
            }
        }
        uint32_t kb[2][FD_KS][2], vb[FD_NT][2];
#pragma unroll
        for (int hh = 0; hh < 2; hh++)
#pragma unroll
            for (int q = 0; q < 4; q++) {
                kb[hh][2 * q][0] = kr[hh][q].x;
                kb[hh][2 * q][1] = kr[hh][q].y;
                kb[hh][2 * q + 1][0] = kr[hh][q].z;
                kb[hh][2 * q + 1][1] = kr[hh][q].w;
                if (q < nq) {
                    vb[4 * q][hh] = movtrans(vr[hh][q].x);
                    vb[4 * q + 1][hh] = movtrans(vr[hh][q].y);
                    vb[4 * q + 2][hh] = movtrans(vr[hh][q].z);
                    vb[4 * q + 3][hh] = movtrans(vr[hh][q].w);
                }
            }
        float sc[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < FD_KS; ks++)
                if (ks < 2 * nq) mma16816(sc[nt], qa[ks], kb[nt][ks][0], kb[nt][ks][1], (T*)nullptr);
        }
        // scores of rows gid (sc[.][0..1]) and gid + 8 (sc[.][2..3]), positions t0 + nt*8 + 2 tig + j
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const bool ok = t0 + nt * 8 + 2 * tig + j < p1;
                sc[nt][j] = ok ? sc[nt][j] * scale : -INFINITY;
                sc[nt][2 + j] = ok ? sc[nt][2 + j] * scale : -INFINITY;
                mx0 = fmaxf(mx0, sc[nt][j]);
                mx1 = fmaxf(mx1, sc[nt][2 + j]);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
        const float cr0 = __expf(m0 - mx0), cr1 = __expf(m1 - mx1);
        m0 = mx0;
        m1 = mx1;
        float pr[2][4];
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                pr[nt][j] = __expf(sc[nt][j] - mx0);
                pr[nt][2 + j] = __expf(sc[nt][2 + j] - mx1);
                s0 += pr[nt][j];
                s1 += pr[nt][2 + j];
            }
        l0 = l0 * cr0 + s0;
        l1 = l1 * cr1 + s1;
        uint32_t pa[4];
        pa[0] = pack2(pr[0][0], pr[0][1], (T*)nullptr);
        pa[1] = pack2(pr[0][2], pr[0][3], (T*)nullptr);
        pa[2] = pack2(pr[1][0], pr[1][1], (T*)nullptr);
        pa[3] = pack2(pr[1][2], pr[1][3], (T*)nullptr);
#pragma unroll
        for (int dt = 0; dt < FD_NT; dt++) {
            if (dt < 4 * nq) {
                o[dt][0] *= cr0;
                o[dt][1] *= cr0;
                o[dt][2] *= cr1;
                o[dt][3] *= cr1;
                mma16816(o[dt], pa, vb[dt][0], vb[dt][1], (T*)nullptr);
            }
        }
    }
    // a row's sum over its 4 lanes
    l0 += __shfl_xor_sync(0xffffffff, l0, 1);
    l0 += __shfl_xor_sync(0xffffffff, l0, 2);
    l1 += __shfl_xor_sync(0xffffffff, l1, 1);
    l1 += __shfl_xor_sync(0xffffffff, l1, 2);
    __syncthreads();  // sh.acc held the prologue's staging
    if (tig == 0) {
        sh.m[warp][gid] = m0;
        sh.m[warp][gid + 8] = m1;
        sh.l[warp][gid] = l0;
        sh.l[warp][gid + 8] = l1;
    }
#pragma unroll
    for (int dt = 0; dt < FD_NT; dt++) {
        const int d = 32 * (dt >> 2) + 2 * (dt & 3) + 8 * tig;  // this lane's columns of tile dt
        if (dt < 4 * nq && dim_ok[dt >> 2]) {
            sh.acc[warp][gid][d] = o[dt][0];
            sh.acc[warp][gid][d + 1] = o[dt][1];
            sh.acc[warp][gid + 8][d] = o[dt][2];
            sh.acc[warp][gid + 8][d + 1] = o[dt][3];
        }
    }
    fd_combine<T>(sh, info, out, part, s, g, c, r, heads, head_dim, splits);
}

// block: (head_dim threads, FD_RLANES); threadIdx.y takes every FD_RLANES-th split, so a head's
// partial accumulators are read with many loads in flight (a loop over 100+ splits one load at a
// time is latency-bound).
constexpr int FD_RLANES = 4;
constexpr int FD_MAXSPLITS = 1024;  // SPLIT_MAX_SPLITS in src/kernels/split_plan.rs

template <typename T>
__device__ void decode_reduce(const SeqInfo* __restrict__ seqs, const float* __restrict__ part,
                              T* __restrict__ out, int heads, int head_dim, int min_chunk, int splits) {
    const int s = blockIdx.x, h = blockIdx.y;
    const SeqInfo info = seqs[s];
    const int n = info.len + 1;
    const int chunk = fd_chunk(n, splits, min_chunk);
    const int active = min(min(splits, FD_MAXSPLITS), (n + chunk - 1) / chunk);
    const float* pp = part + ((size_t)s * heads + h) * splits * (head_dim + 2);
    __shared__ float f_s[FD_MAXSPLITS];  // each split's max, then its weight exp(max - global max)
    __shared__ float l_s[FD_MAXSPLITS];
    __shared__ float red_s[FD_RLANES][FD_MAXD];
    __shared__ float den_s;
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const int nthreads = blockDim.x * blockDim.y;
    for (int c = tid; c < active; c += nthreads) {
        f_s[c] = pp[(size_t)c * (head_dim + 2)];
        l_s[c] = pp[(size_t)c * (head_dim + 2) + 1];
    }
    __syncthreads();
    if (tid < 32) {  // one warp: the global max, the weights and the denominator
        float mg = -INFINITY;
        for (int c = tid; c < active; c += 32) mg = fmaxf(mg, f_s[c]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mg = fmaxf(mg, __shfl_xor_sync(0xffffffff, mg, o));
        float den = 0.f;
        for (int c = tid; c < active; c += 32) {
            const float f = __expf(f_s[c] - mg);
            f_s[c] = f;
            den += l_s[c] * f;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffff, den, o);
        if (tid == 0) den_s = den;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
        float num = 0.f;
#pragma unroll 8
        for (int c = threadIdx.y; c < active; c += FD_RLANES) num += pp[(size_t)c * (head_dim + 2) + 2 + e] * f_s[c];
        red_s[threadIdx.y][e] = num;
    }
    __syncthreads();
    if (threadIdx.y == 0) {
        for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
            float num = 0.f;
#pragma unroll
            for (int k = 0; k < FD_RLANES; k++) num += red_s[k][e];
            out[(size_t)info.row * heads * head_dim + (size_t)h * head_dim + e] = from_f<T>(num / den_s);
        }
    }
}

#define FD_ARGS_DEV(T)                                                                                   \
    const T *qkv, const T *bias, const SeqInfo *seqs, const T *cos_t, const T *sin_t, T *out, float *part, \
        int heads, int groups, int head_dim, int rot_half, float scale, int min_chunk, int splits
#define FD_ARGS_TAB(T)                                                                                   \
    const T *qkv, const T *bias, const __grid_constant__ SeqTable table, const T *cos_t, const T *sin_t,  \
        T *out, float *part, int heads, int groups, int head_dim, int rot_half, float scale, int min_chunk, \
        int splits
#define FD_PASS(SEQS) qkv, bias, SEQS, cos_t, sin_t, out, part, heads, groups, head_dim, rot_half, scale, min_chunk, splits

#define FD_SPLIT(T, NAME, E)                                                                          \
    extern "C" __global__ void __launch_bounds__(FD_WARPS * 32) decode_split##E##_##NAME(FD_ARGS_DEV(T)) { \
        decode_split<T, E>(FD_PASS(seqs));                                                            \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(FD_WARPS * 32) decode_split##E##_t_##NAME(FD_ARGS_TAB(T)) { \
        decode_split<T, E>(FD_PASS(table.s));                                                         \
    }

#define FD_REDUCE(T, NAME)                                                                            \
    extern "C" __global__ void decode_reduce_##NAME(const SeqInfo* seqs, const float* part, T* out,  \
                                                    int heads, int head_dim, int min_chunk, int splits) { \
        decode_reduce<T>(seqs, part, out, heads, head_dim, min_chunk, splits);                       \
    }                                                                                                 \
    extern "C" __global__ void decode_reduce_t_##NAME(const __grid_constant__ SeqTable table,         \
                                                      const float* part, T* out, int heads,           \
                                                      int head_dim, int min_chunk, int splits) {      \
        decode_reduce<T>(table.s, part, out, heads, head_dim, min_chunk, splits);                    \
    }

#define FD_MMA(T, NAME)                                                                               \
    extern "C" __global__ void __launch_bounds__(FD_WARPS * 32) decode_split_mma_##NAME(FD_ARGS_DEV(T)) { \
        decode_split_mma<T>(FD_PASS(seqs));                                                           \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(FD_WARPS * 32) decode_split_mma_t_##NAME(FD_ARGS_TAB(T)) { \
        decode_split_mma<T>(FD_PASS(table.s));                                                        \
    }

#define FD_INSTANTIATE(T, NAME)                                                                       \
    FD_SPLIT(T, NAME, 1)                                                                              \
    FD_SPLIT(T, NAME, 2)                                                                              \
    FD_SPLIT(T, NAME, 4)                                                                              \
    FD_REDUCE(T, NAME)

FD_INSTANTIATE(float, f32)
FD_INSTANTIATE(__half, f16)
FD_INSTANTIATE(__nv_bfloat16, bf16)
FD_MMA(__half, f16)
FD_MMA(__nv_bfloat16, bf16)
