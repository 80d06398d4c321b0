// Flash-decoding: the decode attention of long sequences split over many thread blocks
// (included by glm2.cu, after SeqInfo / SeqTable / to_f / from_f).
//
// decode_split: grid (sequences, groups, splits), FD_WARPS warps. A block takes one KV group of one
//   sequence and one chunk of its positions, and all the query heads of that group (multi-query
//   attention: ChatGLM2's 32 heads share 2 groups), so each key and value is read once per group,
//   not once per head. It first does what the one-block kernel does with the new token (bias,
//   rotary, rounding to T; the block whose chunk holds position `len` stores the new key and
//   value), then each warp walks tiles of FD_TILE positions: lanes hold head_dim / 32 dimensions
//   of all the group's queries in registers; the per-head dot products of a position are summed
//   across the warp by a transposing reduction (16 shuffles for 16 heads instead of 80), after
//   which lane 2h holds head h's score; the online-softmax weights go through shared memory to
//   every lane, which accumulates its dimensions of the values for all heads. The warps of a block
//   are combined in shared memory; with one split the block writes the output, with several it
//   writes (max, sum, unnormalised accumulator) per head for decode_reduce.
// decode_reduce: grid (sequences, heads): combines a head's splits into the output.
//
// Numerics are those of decode_attention: q, k, v rounded to T as stored, scores, softmax and
// accumulation in float32, the output rounded to T.

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
__device__ __forceinline__ void load_e(const T* __restrict__ p, float (&o)[E]) {
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

// part: [rows, heads, splits, 2 + head_dim] float32 (max, sum, accumulator); unused with one split.
template <typename T, int E>
__device__ void decode_split(const T* __restrict__ qkv, const T* __restrict__ bias,
                             const SeqInfo* __restrict__ seqs, const T* __restrict__ cos_t,
                             const T* __restrict__ sin_t, T* __restrict__ out, float* __restrict__ part,
                             int heads, int groups, int head_dim, int rot_half, float scale, int chunk,
                             int splits) {
    const int s = blockIdx.x, g = blockIdx.y, c = blockIdx.z;
    const SeqInfo info = seqs[s];
    const int n = info.len + 1;
    const int p0 = c * chunk;
    if (p0 >= n) return;
    const int p1 = min(n, p0 + chunk);
    const int r = heads / groups;
    const int width = (heads + 2 * groups) * head_dim;
    const T* row = qkv + (size_t)info.row * width;

    __shared__ float q_s[FD_R][FD_MAXD];
    __shared__ float k_s[FD_MAXD];
    __shared__ float v_s[FD_MAXD];
    __shared__ float w_s[FD_WARPS][FD_TILE][FD_R];
    __shared__ float c_s[FD_WARPS][FD_R];
    __shared__ float m_s[FD_WARPS][FD_R];
    __shared__ float l_s[FD_WARPS][FD_R];
    __shared__ float acc_s[FD_WARPS][FD_R][FD_MAXD];

    for (int i = threadIdx.x; i < FD_R * FD_MAXD; i += blockDim.x) q_s[i / FD_MAXD][i % FD_MAXD] = 0.f;
    for (int i = threadIdx.x; i < FD_MAXD; i += blockDim.x) {
        k_s[i] = 0.f;
        v_s[i] = 0.f;
    }
    __syncthreads();
    // the group's queries, key and value of the new token: bias, rotary, rounded to T
    for (int i = threadIdx.x; i < (r + 2) * head_dim; i += blockDim.x) {
        const int which = i / head_dim, e = i % head_dim;
        const int base = which < r ? (g * r + which) * head_dim
                         : which == r ? (heads + g) * head_dim
                                      : (heads + groups + g) * head_dim;
        float x = biased<T>(row, bias, base + e);
        if (which <= r && e < 2 * rot_half) {
            const float xp = biased<T>(row, bias, base + (e ^ 1));
            const float cc = to_f(cos_t[(size_t)info.rot * rot_half + e / 2]);
            const float sn = to_f(sin_t[(size_t)info.rot * rot_half + e / 2]);
            x = (e & 1) == 0 ? x * cc - xp * sn : xp * sn + x * cc;
        }
        x = to_f(from_f<T>(x));
        if (which < r)
            q_s[which][e] = x;
        else if (which == r)
            k_s[e] = x;
        else
            v_s[e] = x;
    }
    __syncthreads();

    T* kc = reinterpret_cast<T*>(info.k) + (size_t)g * info.cap * head_dim;
    T* vc = reinterpret_cast<T*>(info.v) + (size_t)g * info.cap * head_dim;
    if (p0 <= info.len && info.len < p1) {  // this block's chunk holds the new position
        for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
            kc[(size_t)info.len * head_dim + e] = from_f<T>(k_s[e]);
            vc[(size_t)info.len * head_dim + e] = from_f<T>(v_s[e]);
        }
    }

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int d0 = lane * E;             // this lane's first dimension
    const bool dims = d0 < head_dim;     // head_dim % E == 0: a lane has all E or none
    float q[FD_R][E], acc[FD_R][E];
#pragma unroll
    for (int h = 0; h < FD_R; h++)
#pragma unroll
        for (int j = 0; j < E; j++) {
            q[h][j] = q_s[h][d0 + j];
            acc[h][j] = 0.f;
        }
    float m = -INFINITY, l = 0.f;  // of head lane >> 1

    for (int t0 = p0 + warp * FD_TILE; t0 < p1; t0 += FD_WARPS * FD_TILE) {
        float kv[FD_TILE][E], vv[FD_TILE][E];
#pragma unroll
        for (int t = 0; t < FD_TILE; t++) {
            const int p = t0 + t;
            if (p < p1 && dims && p != info.len) {
                load_e<T, E>(kc + (size_t)p * head_dim + d0, kv[t]);
                load_e<T, E>(vc + (size_t)p * head_dim + d0, vv[t]);
            } else {
#pragma unroll
                for (int j = 0; j < E; j++) {
                    const bool now = p < p1 && dims;  // p == len: the new token, from shared memory
                    kv[t][j] = now ? k_s[d0 + j] : 0.f;
                    vv[t][j] = now ? v_s[d0 + j] : 0.f;
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
            c_s[warp][lane >> 1] = corr;
#pragma unroll
            for (int t = 0; t < FD_TILE; t++) w_s[warp][t][lane >> 1] = w[t];
        }
        __syncwarp();
#pragma unroll
        for (int h = 0; h < FD_R; h++) {
            const float ch = c_s[warp][h];
#pragma unroll
            for (int j = 0; j < E; j++) acc[h][j] *= ch;
#pragma unroll
            for (int t = 0; t < FD_TILE; t++) {
                const float wt = w_s[warp][t][h];
#pragma unroll
                for (int j = 0; j < E; j++) acc[h][j] += wt * vv[t][j];
            }
        }
        __syncwarp();
    }

    // combine the warps of the block
    if ((lane & 1) == 0) {
        m_s[warp][lane >> 1] = m;
        l_s[warp][lane >> 1] = l;
    }
#pragma unroll
    for (int h = 0; h < FD_R; h++)
#pragma unroll
        for (int j = 0; j < E; j++) acc_s[warp][h][d0 + j] = acc[h][j];
    __syncthreads();
    for (int i = threadIdx.x; i < r * head_dim; i += blockDim.x) {
        const int h = i / head_dim, e = i % head_dim;
        float mg = -INFINITY;
#pragma unroll
        for (int wi = 0; wi < FD_WARPS; wi++) mg = fmaxf(mg, m_s[wi][h]);
        float num = 0.f, den = 0.f;
#pragma unroll
        for (int wi = 0; wi < FD_WARPS; wi++) {
            if (m_s[wi][h] == -INFINITY) continue;  // a warp that saw no position
            const float f = __expf(m_s[wi][h] - mg);
            num += acc_s[wi][h][e] * f;
            den += l_s[wi][h] * f;
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

template <typename T>
__device__ void decode_reduce(const SeqInfo* __restrict__ seqs, const float* __restrict__ part,
                              T* __restrict__ out, int heads, int head_dim, int chunk, int splits) {
    const int s = blockIdx.x, h = blockIdx.y;
    const SeqInfo info = seqs[s];
    const int active = min(splits, (info.len + 1 + chunk - 1) / chunk);
    const float* pp = part + ((size_t)s * heads + h) * splits * (head_dim + 2);
    float mg = -INFINITY;
    for (int c = 0; c < active; c++) mg = fmaxf(mg, pp[(size_t)c * (head_dim + 2)]);
    for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
        float num = 0.f, den = 0.f;
        for (int c = 0; c < active; c++) {
            const float* q = pp + (size_t)c * (head_dim + 2);
            const float f = __expf(q[0] - mg);
            num += q[2 + e] * f;
            den += q[1] * f;
        }
        out[(size_t)info.row * heads * head_dim + (size_t)h * head_dim + e] = from_f<T>(num / den);
    }
}

#define FD_SPLIT(T, NAME, E)                                                                          \
    extern "C" __global__ void __launch_bounds__(FD_WARPS * 32)                                      \
        decode_split##E##_##NAME(const T* qkv, const T* bias, const SeqInfo* seqs, const T* cos_t,   \
                                 const T* sin_t, T* out, float* part, int heads, int groups,          \
                                 int head_dim, int rot_half, float scale, int chunk, int splits) {    \
        decode_split<T, E>(qkv, bias, seqs, cos_t, sin_t, out, part, heads, groups, head_dim,        \
                           rot_half, scale, chunk, splits);                                           \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(FD_WARPS * 32) decode_split##E##_t_##NAME(           \
        const T* qkv, const T* bias, const __grid_constant__ SeqTable table, const T* cos_t,          \
        const T* sin_t, T* out, float* part, int heads, int groups, int head_dim, int rot_half,       \
        float scale, int chunk, int splits) {                                                         \
        decode_split<T, E>(qkv, bias, table.s, cos_t, sin_t, out, part, heads, groups, head_dim,     \
                           rot_half, scale, chunk, splits);                                           \
    }

#define FD_INSTANTIATE(T, NAME)                                                                       \
    FD_SPLIT(T, NAME, 1)                                                                              \
    FD_SPLIT(T, NAME, 2)                                                                              \
    FD_SPLIT(T, NAME, 4)                                                                              \
    extern "C" __global__ void decode_reduce_##NAME(const SeqInfo* seqs, const float* part, T* out,  \
                                                    int heads, int head_dim, int chunk, int splits) { \
        decode_reduce<T>(seqs, part, out, heads, head_dim, chunk, splits);                           \
    }                                                                                                 \
    extern "C" __global__ void decode_reduce_t_##NAME(const __grid_constant__ SeqTable table,         \
                                                      const float* part, T* out, int heads,           \
                                                      int head_dim, int chunk, int splits) {          \
        decode_reduce<T>(table.s, part, out, heads, head_dim, chunk, splits);                        \
    }

FD_INSTANTIATE(float, f32)
FD_INSTANTIATE(__half, f16)
FD_INSTANTIATE(__nv_bfloat16, bf16)
