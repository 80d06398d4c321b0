// glm2rs CUDA kernels (feature "cuda"; compiled to PTX by build.rs with nvcc).
//
// decode_attention: one decoding step of many sequences at once, one launch per layer. For each
//   sequence (its own KV cache, length and rotary position) and each query head: add the
//   query_key_value bias, rotate q and the new k (interleaved pairs on the first rotary
//   dimensions, cos/sin tables of the model dtype as the official code), write the new k and v
//   into the cache at the sequence's length, and attend over the cache (multi-query groups read
//   in place, never copied out per head) with an online softmax in float32.
// swiglu: silu(x[:, :f]) * x[:, f:] for contiguous rows.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Mirrors `SeqInfo` in src/kernels/cuda.rs (#[repr(C)], 48 bytes). The KV cache is paged
// (src/model/kv_pool.rs): position p of a sequence is row p % block_size of block blocks[p / block_size];
// block b is rows (b % slab_blocks) * block_size .. of slab b / slab_blocks, whose address is slabs[b /
// slab_blocks]; a row holds `groups` keys (or values) of head_dim each.
struct SeqInfo {
    uint64_t k;       // this layer's key slab addresses: u64 [max_slabs]
    uint64_t v;       // value slab addresses
    uint64_t blocks;  // the sequence's block ids: u32 [>= (len + 1) / block_size]
    int32_t len;      // entries held (a P-Tuning prefix included): the new token goes at `len`
    int32_t rot;      // rotary position of the new token
    int32_t row;      // its row in qkv / out
    int32_t shift;    // log2(block_size)
    int32_t slab_shift;  // log2(blocks per slab)
    int32_t pad;
};

// Key (slabs = info.k) or value (info.v) of group g at position p. Positions p and p + i of one
// block are i * groups * head_dim elements apart.
template <typename T>
__device__ __forceinline__ T* kv_at(uint64_t slabs, const SeqInfo& s, int p, int g, int groups, int head_dim) {
    const uint32_t blk = reinterpret_cast<const uint32_t*>(s.blocks)[p >> s.shift];
    const uint64_t base = reinterpret_cast<const uint64_t*>(slabs)[blk >> s.slab_shift];
    const size_t row = ((size_t)(blk & ((1u << s.slab_shift) - 1u)) << s.shift) + (size_t)(p & ((1 << s.shift) - 1));
    return reinterpret_cast<T*>(base) + (row * groups + g) * head_dim;
}

constexpr int MAX_E = 8;       // head_dim <= 32 * MAX_E
constexpr int WARPS = 16;      // warps per block

// grid: (sequences, heads); block: WARPS * 32 threads.
// qkv: [rows, (heads + 2 groups) * head_dim]; bias: same width or null; cos/sin: [seq_length, rot_half];
// out: [rows, heads * head_dim].
template <typename T>
__device__ void decode_attention(const T* __restrict__ qkv, const T* __restrict__ bias,
                                 const SeqInfo* __restrict__ seqs, const T* __restrict__ cos_t,
                                 const T* __restrict__ sin_t, T* __restrict__ out, int heads, int groups,
                                 int head_dim, int rot_half, float scale) {
    const int s = blockIdx.x;
    const int h = blockIdx.y;
    const SeqInfo info = seqs[s];
    const int r = heads / groups;
    const int g = h / r;
    const int width = (heads + 2 * groups) * head_dim;
    const T* row = qkv + (size_t)info.row * width;

    __shared__ float q_s[32 * MAX_E];
    __shared__ float k_s[32 * MAX_E];
    __shared__ float v_s[32 * MAX_E];
    __shared__ float m_s[WARPS];
    __shared__ float l_s[WARPS];
    __shared__ float acc_s[WARPS][32 * MAX_E];

    // q (head h), k and v (group g) of the new token, bias added, rounded to T as stored.
    for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
        const int vi = (heads + groups) * head_dim + g * head_dim + e;
        float v = to_f(row[vi]) + (bias ? to_f(bias[vi]) : 0.f);
        v_s[e] = to_f(from_f<T>(v));
    }
    for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
        const int qi = h * head_dim + e;
        const int ki = heads * head_dim + g * head_dim + e;
        float q = to_f(from_f<T>(to_f(row[qi]) + (bias ? to_f(bias[qi]) : 0.f)));
        float k = to_f(from_f<T>(to_f(row[ki]) + (bias ? to_f(bias[ki]) : 0.f)));
        if (e < 2 * rot_half) {
            const int i = e / 2;
            const int pe = e ^ 1;  // the other element of the pair
            float qp = to_f(from_f<T>(to_f(row[h * head_dim + pe]) + (bias ? to_f(bias[h * head_dim + pe]) : 0.f)));
            float kp = to_f(from_f<T>(to_f(row[heads * head_dim + g * head_dim + pe]) +
                                      (bias ? to_f(bias[heads * head_dim + g * head_dim + pe]) : 0.f)));
            const float c = to_f(cos_t[(size_t)info.rot * rot_half + i]);
            const float sn = to_f(sin_t[(size_t)info.rot * rot_half + i]);
            if ((e & 1) == 0) {  // x0' = x0 c - x1 s
                q = q * c - qp * sn;
                k = k * c - kp * sn;
            } else {  // x1' = x0 s + x1 c
                q = qp * sn + q * c;
                k = kp * sn + k * c;
            }
        }
        q_s[e] = to_f(from_f<T>(q));
        k_s[e] = to_f(from_f<T>(k));
    }
    __syncthreads();

    // The first head of the group stores the new key and value; the others use k_s / v_s.
    if (h % r == 0) {
        T* kn = kv_at<T>(info.k, info, info.len, g, groups, head_dim);
        T* vn = kv_at<T>(info.v, info, info.len, g, groups, head_dim);
        for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
            kn[e] = from_f<T>(k_s[e]);
            vn[e] = from_f<T>(v_s[e]);
        }
    }

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int E = (head_dim + 31) / 32;
    float qr[MAX_E];
#pragma unroll
    for (int j = 0; j < MAX_E; j++) {
        const int e = lane * E + j;
        qr[j] = (j < E && e < head_dim) ? q_s[e] : 0.f;
    }
    float m = -INFINITY, l = 0.f;
    float acc[MAX_E];
#pragma unroll
    for (int j = 0; j < MAX_E; j++) acc[j] = 0.f;

    const int n = info.len + 1;
    for (int p = warp; p < n; p += WARPS) {
        float kv[MAX_E], vv[MAX_E];
        if (p == info.len) {
#pragma unroll
            for (int j = 0; j < MAX_E; j++) {
                const int e = lane * E + j;
                kv[j] = (j < E && e < head_dim) ? k_s[e] : 0.f;
                vv[j] = (j < E && e < head_dim) ? v_s[e] : 0.f;
            }
        } else {
            const T* kp = kv_at<T>(info.k, info, p, g, groups, head_dim);
            const T* vp = kv_at<T>(info.v, info, p, g, groups, head_dim);
#pragma unroll
            for (int j = 0; j < MAX_E; j++) {
                const int e = lane * E + j;
                const bool ok = j < E && e < head_dim;
                kv[j] = ok ? to_f(kp[e]) : 0.f;
                vv[j] = ok ? to_f(vp[e]) : 0.f;
            }
        }
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < MAX_E; j++) dot += qr[j] * kv[j];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffff, dot, o);
        const float sc = dot * scale;
        const float m_new = fmaxf(m, sc);
        const float c = __expf(m - m_new);
        const float w = __expf(sc - m_new);
        l = l * c + w;
#pragma unroll
        for (int j = 0; j < MAX_E; j++) acc[j] = acc[j] * c + w * vv[j];
        m = m_new;
    }
    // combine the warps
    if (lane == 0) {
        m_s[warp] = m;
        l_s[warp] = l;
    }
#pragma unroll
    for (int j = 0; j < MAX_E; j++) {
        const int e = lane * E + j;
        if (j < E && e < head_dim) acc_s[warp][e] = acc[j];
    }
    __syncthreads();
    float mg = -INFINITY;
    for (int w = 0; w < WARPS; w++) mg = fmaxf(mg, m_s[w]);
    for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
        float num = 0.f, den = 0.f;
        for (int w = 0; w < WARPS; w++) {
            if (m_s[w] == -INFINITY) continue;  // a warp that saw no position
            const float f = __expf(m_s[w] - mg);
            num += acc_s[w][e] * f;
            den += l_s[w] * f;
        }
        out[(size_t)info.row * heads * head_dim + (size_t)h * head_dim + e] = from_f<T>(num / den);
    }
}

// silu(a) * b of a gate and an up value, each first rounded to T (as the matmul output they come
// from), silu rounded to T before the product, as candle's silu then mul.
template <typename T>
__device__ __forceinline__ T swiglu_pair(float g, float u) {
    const float a = to_f(from_f<T>(g));
    const float b = to_f(from_f<T>(u));
    const float sa = to_f(from_f<T>(a / (1.f + __expf(-a))));
    return from_f<T>(sa * b);
}

// grid: (column blocks, rows or 65535); vec: elements per 16-byte access (when f is a multiple of
// it and both pointers are 16-byte aligned, as the launcher checks) or 1.
template <typename T>
__device__ void swiglu(const T* __restrict__ x, T* __restrict__ out, int rows, int f, int vec) {
    constexpr int V = 16 / sizeof(T);
    const int stride = gridDim.x * blockDim.x, c0 = blockIdx.x * blockDim.x + threadIdx.x;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const T* xr = x + (size_t)r * 2 * f;
        T* orow = out + (size_t)r * f;
        if (vec == V) {
            for (int c = c0; c < f / V; c += stride) {
                const uint4 gv = reinterpret_cast<const uint4*>(xr)[c];
                const uint4 uv = reinterpret_cast<const uint4*>(xr + f)[c];
                const T* g = reinterpret_cast<const T*>(&gv);
                const T* u = reinterpret_cast<const T*>(&uv);
                uint4 ov;
                T* o = reinterpret_cast<T*>(&ov);
#pragma unroll
                for (int i = 0; i < V; i++) o[i] = swiglu_pair<T>(to_f(g[i]), to_f(u[i]));
                reinterpret_cast<uint4*>(orow)[c] = ov;
            }
        } else {
            for (int c = c0; c < f; c += stride) orow[c] = swiglu_pair<T>(to_f(xr[c]), to_f(xr[f + c]));
        }
    }
}

// Up to MAX_TABLE_SEQS sequences travel in the launch's parameters (no host-to-device copy per
// layer); more go through a table in device memory. Mirrors `TABLE_SEQS` in src/kernels/cuda.rs.
constexpr int MAX_TABLE_SEQS = 64;
struct SeqTable {
    SeqInfo s[MAX_TABLE_SEQS];
};

#define INSTANTIATE(T, NAME)                                                                         \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                         \
        decode_attention_##NAME(const T* qkv, const T* bias, const SeqInfo* seqs, const T* cos_t,    \
                                const T* sin_t, T* out, int heads, int groups, int head_dim,         \
                                int rot_half, float scale) {                                         \
        decode_attention<T>(qkv, bias, seqs, cos_t, sin_t, out, heads, groups, head_dim, rot_half,   \
                            scale);                                                                  \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                         \
        decode_attention_t_##NAME(const T* qkv, const T* bias, const __grid_constant__ SeqTable table, \
                                  const T* cos_t, const T* sin_t, T* out, int heads, int groups,     \
                                  int head_dim, int rot_half, float scale) {                         \
        decode_attention<T>(qkv, bias, table.s, cos_t, sin_t, out, heads, groups, head_dim,          \
                            rot_half, scale);                                                        \
    }                                                                                                \
    extern "C" __global__ void swiglu_##NAME(const T* x, T* out, int rows, int f, int vec) {         \
        swiglu<T>(x, out, rows, f, vec);                                                             \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)

#include "flash_decode.cuh"

// ---------------------------------------------------------------------------------------------
// add_rmsnorm: h = a + b (rounded to T, as candle's add), y = rmsnorm(h) * w (statistics in
// float32, result rounded to T). `b` may be null (plain RMSNorm of a). out: [2, rows, n]
// (h, then y). One block per row; each thread takes `vec` consecutive elements at a time (16
// bytes, where n is a multiple and all pointers are 16-byte aligned, as the launcher checks; else
// 1), the first group kept in registers, the rest (n > vec * blockDim) read back.
// The type of one access of V elements of T: T itself or 16 bytes.
template <int V, typename T> struct VecOf { using type = uint4; };
template <typename T> struct VecOf<1, T> { using type = T; };

template <typename T, int V>
__device__ __forceinline__ void add_rmsnorm_v(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ w,
                                              T* __restrict__ out, int rows, int n, float eps) {
    using Vec = typename VecOf<V, T>::type;
    const int r = blockIdx.x, nv = n / V;
    const Vec* ar = reinterpret_cast<const Vec*>(a + (size_t)r * n);
    const Vec* br = b ? reinterpret_cast<const Vec*>(b + (size_t)r * n) : nullptr;
    const Vec* wv = reinterpret_cast<const Vec*>(w);
    Vec* hr = reinterpret_cast<Vec*>(out + (size_t)r * n);
    Vec* yr = reinterpret_cast<Vec*>(out + (size_t)rows * n + (size_t)r * n);
    // h of group c (rounded to T), stored, its squares summed
    auto load_h = [&](int c, float (&h)[V], float& ss) {
        Vec av = ar[c], bv, hv;
        if (br) bv = br[c];
        const T* ae = reinterpret_cast<const T*>(&av);
        const T* be = reinterpret_cast<const T*>(&bv);
        T* he = reinterpret_cast<T*>(&hv);
#pragma unroll
        for (int i = 0; i < V; i++) {
            float x = to_f(ae[i]);
            if (br) x = to_f(from_f<T>(x + to_f(be[i])));
            he[i] = from_f<T>(x);
            h[i] = x;
            ss += x * x;
        }
        hr[c] = hv;
    };
    auto store_y = [&](int c, const float (&h)[V], float inv) {
        Vec wl = wv[c], yv;
        const T* we = reinterpret_cast<const T*>(&wl);
        T* ye = reinterpret_cast<T*>(&yv);
#pragma unroll
        for (int i = 0; i < V; i++) ye[i] = from_f<T>(h[i] * inv * to_f(we[i]));
        yr[c] = yv;
    };
    float h0[V], ss = 0.f;
    const int c0 = threadIdx.x;
    if (c0 < nv) load_h(c0, h0, ss);
    for (int c = c0 + blockDim.x; c < nv; c += blockDim.x) {
        float h[V];
        load_h(c, h, ss);
    }
    __shared__ float red[32];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x + 31) / 32 ? red[threadIdx.x] : 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(red[0] / n + eps);
    if (c0 < nv) store_y(c0, h0, inv);
    for (int c = c0 + blockDim.x; c < nv; c += blockDim.x) {
        // reads back what this thread wrote: same thread, same index
        Vec hv = hr[c];
        const T* he = reinterpret_cast<const T*>(&hv);
        float h[V];
#pragma unroll
        for (int i = 0; i < V; i++) h[i] = to_f(he[i]);
        store_y(c, h, inv);
    }
}

template <typename T>
__device__ void add_rmsnorm(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ w,
                            T* __restrict__ out, int rows, int n, float eps, int vec) {
    if (vec == 16 / (int)sizeof(T))
        add_rmsnorm_v<T, 16 / sizeof(T)>(a, b, w, out, rows, n, eps);
    else
        add_rmsnorm_v<T, 1>(a, b, w, out, rows, n, eps);
}

// argmax of each row of float32 logits (the lowest index among equal maxima).
__device__ void argmax_rows(const float* __restrict__ x, uint32_t* __restrict__ out, int n) {
    const float* xr = x + (size_t)blockIdx.x * n;
    float best = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = xr[i];
        if (v > best || (v == best && i < bi)) { best = v; bi = i; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffff, best, o);
        const int oi = __shfl_xor_sync(0xffffffff, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    __shared__ float bv[32];
    __shared__ int bx[32];
    if ((threadIdx.x & 31) == 0) { bv[threadIdx.x >> 5] = best; bx[threadIdx.x >> 5] = bi; }
    __syncthreads();
    if (threadIdx.x < 32) {
        const int nw = (blockDim.x + 31) / 32;
        best = threadIdx.x < nw ? bv[threadIdx.x] : -INFINITY;
        bi = threadIdx.x < nw ? bx[threadIdx.x] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffff, best, o);
            const int oi = __shfl_xor_sync(0xffffffff, bi, o);
            if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
        }
        if (threadIdx.x == 0) out[blockIdx.x] = bi == 0x7fffffff ? 0u : (uint32_t)bi;
    }
}

// Causal softmax of attention scores (prefill): rows of `cols` float32 scores, row r belongs to
// query position first_q + (r % tc); columns after it are masked. Scores are scaled first.
// Output probabilities rounded to T.
template <typename T>
__device__ void causal_softmax(const float* __restrict__ x, T* __restrict__ out, int cols, int tc,
                               int first_q, float scale) {
    const int r = blockIdx.x;
    const int qpos = first_q + (r % tc);
    const int vis = min(cols, qpos + 1);
    const float* xr = x + (size_t)r * cols;
    T* orow = out + (size_t)r * cols;
    __shared__ float red[32];
    float m = -INFINITY;
    for (int i = threadIdx.x; i < vis; i += blockDim.x) m = fmaxf(m, xr[i] * scale);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x + 31) / 32 ? red[threadIdx.x] : -INFINITY;
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    m = red[0];
    __syncthreads();
    float sum = 0.f;
    for (int i = threadIdx.x; i < vis; i += blockDim.x) sum += __expf(xr[i] * scale - m);
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x + 31) / 32 ? red[threadIdx.x] : 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (threadIdx.x == 0) red[0] = v;
    }
    __syncthreads();
    const float inv = 1.f / red[0];
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        orow[i] = from_f<T>(i < vis ? __expf(xr[i] * scale - m) * inv : 0.f);
}

// y[m, n] = sum_k x[m, k] w[n, k] for a few rows m < M (decoding): each warp streams one weight
// row in 16-byte vectors; x rows are read through the cache. K must be a multiple of the vector
// width and the pointers 16-byte aligned (the host checks).
template <typename T> struct Vec16;
template <> struct Vec16<float> { static constexpr int N = 4; };
template <> struct Vec16<__half> { static constexpr int N = 8; };
template <> struct Vec16<__nv_bfloat16> { static constexpr int N = 8; };

template <typename T, int M>
__device__ void gemv(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int n, int k) {
    constexpr int V = Vec16<T>::N;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    const T* wr = w + (size_t)row * k;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; m++) acc[m] = 0.f;
#pragma unroll 4
    for (int k0 = lane * V; k0 < k; k0 += 32 * V) {
        const uint4 wv = *reinterpret_cast<const uint4*>(wr + k0);
        const T* we = reinterpret_cast<const T*>(&wv);
        float wf[V];
#pragma unroll
        for (int j = 0; j < V; j++) wf[j] = to_f(we[j]);
#pragma unroll
        for (int m = 0; m < M; m++) {
            const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * k + k0));
            const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
            for (int j = 0; j < V; j++) acc[m] += wf[j] * to_f(xe[j]);
        }
    }
#pragma unroll
    for (int m = 0; m < M; m++) {
        float v = acc[m];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (lane == 0) y[(size_t)m * n + row] = from_f<T>(v);
    }
}

// One row of x through dense_h_to_4h and SwiGLU at once: warp j computes the gate row j and the up
// row j + f (in the order and with the rounding of `gemv` then `swiglu`) and writes swiglu(gate, up).
template <typename T>
__device__ void gemv_swiglu(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int f, int k) {
    constexpr int V = Vec16<T>::N;
    const int lane = threadIdx.x & 31;
    const int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (j >= f) return;
    const T* wr[2] = {w + (size_t)j * k, w + (size_t)(j + f) * k};
    float acc[2] = {0.f, 0.f};
#pragma unroll 4
    for (int k0 = lane * V; k0 < k; k0 += 32 * V) {
        const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + k0));
        const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const uint4 wv = *reinterpret_cast<const uint4*>(wr[r] + k0);
            const T* we = reinterpret_cast<const T*>(&wv);
#pragma unroll
            for (int e = 0; e < V; e++) acc[r] += to_f(we[e]) * to_f(xe[e]);
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++)
        for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffff, acc[r], o);
    if (lane == 0) y[j] = swiglu_pair<T>(acc[0], acc[1]);
}

#define GEMV(T, NAME, M)                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                                  \
        gemv##M##_##NAME(const T* x, const T* w, T* y, int n, int k) {                                 \
        gemv<T, M>(x, w, y, n, k);                                                                     \
    }

#define INSTANTIATE2(T, NAME)                                                                          \
    extern "C" __global__ void add_rmsnorm_##NAME(const T* a, const T* b, const T* w, T* out, int rows, \
                                                  int n, float eps, int vec) {                         \
        add_rmsnorm<T>(a, b, w, out, rows, n, eps, vec);                                               \
    }                                                                                                  \
    extern "C" __global__ void causal_softmax_##NAME(const float* x, T* out, int cols, int tc,         \
                                                     int first_q, float scale) {                       \
        causal_softmax<T>(x, out, cols, tc, first_q, scale);                                           \
    }                                                                                                  \
    GEMV(T, NAME, 1) GEMV(T, NAME, 2) GEMV(T, NAME, 3) GEMV(T, NAME, 4)                               \
    GEMV(T, NAME, 5) GEMV(T, NAME, 6) GEMV(T, NAME, 7) GEMV(T, NAME, 8)                               \
    extern "C" __global__ void __launch_bounds__(256)                                                  \
        gemv_swiglu_##NAME(const T* x, const T* w, T* y, int f, int k) {                               \
        gemv_swiglu<T>(x, w, y, f, k);                                                                 \
    }

INSTANTIATE2(float, f32)
INSTANTIATE2(__half, f16)
INSTANTIATE2(__nv_bfloat16, bf16)

extern "C" __global__ void argmax_f32(const float* x, uint32_t* out, int n) { argmax_rows(x, out, n); }

// ---------------------------------------------------------------------------------------------
// flash_prefill: causal attention of a prompt block in one kernel (FlashAttention-2 style) for
// 16-bit models, on tensor cores (mma m16n8k16, float32 accumulation): scores, online softmax in
// float32 and the product with the values never leave the chip. Queries [b, heads, t, D]
// (contiguous), keys and values [b, groups, L, D] rows of D contiguous (batch / group strides
// given: the KV cache's views), multi-query groups read in place. Query i sits at position
// past + i and sees keys 0..past + i. Grid (ceil(t / 64), heads, b), 128 threads: each warp 16
// query rows; key and value tiles of 64 rows through shared memory in two stages (dynamic shared
// memory: flash_smem_bytes), the next copied (cp.async) while the current is used.

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// d += a (16x16, row) * b (16x8, col), float32 accumulators
template <typename T> __device__ __forceinline__ void mma16816(float* d, const uint32_t* a, const uint32_t* b);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<__half>(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One online-softmax step of a warp's two accumulator rows (its rows gr and gr + 8) over NB blocks
// of 8 keys, in the accumulator layout of mma.m16n8 and wgmma.m64nN (s[4j + 2rr + e]: row rr, key
// k0 + 8j + 2tq + e): scores times `scale`, keys after qpos0 + 8rr or from L on masked where
// `mask`; the running max m (of scaled scores) and sum l updated (a row's 4 lanes together), s left
// holding the probabilities and `alphas` the factors the output rows take (rescale_o;
// online_softmax_step does both, flash_wgmma rescales after its P V product landed).
// EXP2: `scale` is in log2 units and the exponentials are exp2 (flash_wgmma); else natural exp
// (flash_prefill). The maximum is taken of the raw scores (scale > 0) and each probability is one
// fused multiply-add and one exponential; a tile without masked keys takes a path without the
// 2 x NB x 2 position tests (the prompt kernels are bound by instruction issue). LAZY (as
// FlashAttention-4): a row keeps its running max until a tile's max exceeds it by more than 8
// (log2 units), so probabilities stay below 2^8 before the final division and most tiles skip
// rescaling o; the result is the same softmax.
template <int NB, bool EXP2, bool MASK, bool LAZY>
__device__ __forceinline__ void softmax_rows(float* s, float (&m)[2], float (&l)[2], float (&alphas)[2], float scale,
                                             int k0, int qpos0, int L, int tq) {
    auto ex = [](float x) { return EXP2 ? exp2f(x) : __expf(x); };
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        const int qpos = qpos0 + 8 * rr;
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < NB; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float& x = s[4 * j + 2 * rr + e];
                if (MASK) {
                    const int key = k0 + 8 * j + 2 * tq + e;
                    if (key > qpos || key >= L) x = -INFINITY;
                }
                mx = fmaxf(mx, x);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        float mnew = fmaxf(m[rr], mx * scale);  // finite: key 0 is in the first tile
        if (LAZY && mnew <= m[rr] + 8.f) mnew = m[rr];
        const float alpha = ex(m[rr] - mnew);
        alphas[rr] = alpha;
        float rs = 0.f;
#pragma unroll
        for (int j = 0; j < NB; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const float p = ex(fmaf(s[4 * j + 2 * rr + e], scale, -mnew));
                s[4 * j + 2 * rr + e] = p;
                rs += p;
            }
        rs += __shfl_xor_sync(0xffffffff, rs, 1);
        rs += __shfl_xor_sync(0xffffffff, rs, 2);
        l[rr] = l[rr] * alpha + rs;
        m[rr] = mnew;
    }
}

// The NO 8-column blocks of o rescaled by the rows' alphas (softmax_rows); LAZY: skipped when no
// row of the warp changed its max (a branch the whole warp takes together).
template <int NO, bool LAZY>
__device__ __forceinline__ void rescale_o(float* o, const float (&alphas)[2]) {
    if (LAZY && !__any_sync(0xffffffff, alphas[0] != 1.f || alphas[1] != 1.f)) return;
#pragma unroll
    for (int d = 0; d < NO; d++) {
        o[4 * d] *= alphas[0];
        o[4 * d + 1] *= alphas[0];
        o[4 * d + 2] *= alphas[1];
        o[4 * d + 3] *= alphas[1];
    }
}

template <int NB, int NO, bool EXP2, bool MASK, bool LAZY>
__device__ __forceinline__ void online_softmax_step(float* s, float* o, float (&m)[2], float (&l)[2], float scale,
                                                    int k0, int qpos0, int L, int tq) {
    float alphas[2];
    softmax_rows<NB, EXP2, MASK, LAZY>(s, m, l, alphas, scale, k0, qpos0, L, tq);
    rescale_o<NO, LAZY>(o, alphas);
}

template <int NB, int NO, bool EXP2, bool LAZY = false>
__device__ __forceinline__ void online_softmax(float* s, float* o, float (&m)[2], float (&l)[2], float scale,
                                               bool mask, int k0, int qpos0, int L, int tq) {
    if (mask)
        online_softmax_step<NB, NO, EXP2, true, LAZY>(s, o, m, l, scale, k0, qpos0, L, tq);
    else
        online_softmax_step<NB, NO, EXP2, false, LAZY>(s, o, m, l, scale, k0, qpos0, L, tq);
}

constexpr int FA_BQ = 64;  // query rows per block (16 per warp)
constexpr int FA_BK = 64;  // keys per tile
constexpr int FA_PAD = 8;  // shared-memory row padding (conflict-free ldmatrix rows)

// Shared memory of a flash_prefill block: two stages of a key and a value tile.
template <int D>
constexpr int flash_smem_bytes() { return 2 * 2 * FA_BK * (D + FA_PAD) * 2; }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    const int n = pred ? 16 : 0;  // 0: the 16 bytes are zero-filled, nothing is read
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8x8 16-bit matrices from shared memory (lanes 8m..8m+7 address matrix m's rows): in
// register m, lane l holds row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1; `.trans`: row and
// column swapped.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
    const unsigned s = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// Each block takes FA_BQ query rows of one head, its 4 warps 16 rows each, and walks the key
// tiles they see (causal) with the next tile's keys and values copied in (cp.async) while the
// current one is used; B fragments of K (scores) and V (output, transposed on the fly) come
// from ldmatrix. Blocks start with the last query rows (the most tiles) so the short ones fill
// the tail. PAGED: keys and values read through a sequence's block table (`paged`, b = 1)
// instead of the strided k / v, the output token-major ([t, heads, D]).
template <typename T, int D, bool PAGED>
__device__ void flash_prefill(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                              T* __restrict__ out, int t, int L, int past, int heads, int groups,
                              long long k_bs, long long k_gs, long long v_bs, long long v_gs, float scale,
                              const SeqInfo& paged) {
    static_assert(D % 32 == 0, "head dim in whole pairs of mma chunks");
    constexpr int LD = D + FA_PAD;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    T* sk = reinterpret_cast<T*>(fa_smem);  // [2][FA_BK][LD]
    T* sv = sk + 2 * FA_BK * LD;            // [2][FA_BK][LD]
    const int qt = gridDim.x - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int g = h / (heads / groups);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gr = lane >> 2, tq = lane & 3;
    const T* qb = q + (size_t)(b * heads + h) * t * D;
    const T* kb = PAGED ? nullptr : k + b * k_bs + g * k_gs;
    const T* vb = PAGED ? nullptr : v + b * v_bs + g * v_gs;
    const int nkeys = min(past + min(qt * FA_BQ + FA_BQ, t), L);  // keys the block's last row sees
    const int ntiles = (nkeys + FA_BK - 1) / FA_BK;
    auto load = [&](int tile, int stage) {
        const int k0 = tile * FA_BK;
        T* ks = sk + stage * FA_BK * LD;
        T* vs = sv + stage * FA_BK * LD;
        for (int i = threadIdx.x; i < FA_BK * D / 8; i += blockDim.x) {
            const int row = i / (D / 8), c8 = (i % (D / 8)) * 8;
            const int p = k0 + row;
            const bool ok = p < L;
            const int pc = ok ? p : L - 1;  // an address that exists (nothing is read from it)
            const T* kr;
            const T* vr;
            if constexpr (PAGED) {
                kr = kv_at<T>(paged.k, paged, pc, g, groups, D);
                vr = kv_at<T>(paged.v, paged, pc, g, groups, D);
            } else {
                kr = kb + (size_t)pc * D;
                vr = vb + (size_t)pc * D;
            }
            cp_async16(ks + row * LD + c8, kr + c8, ok);
            cp_async16(vs + row * LD + c8, vr + c8, ok);
        }
        cp_async_commit();
    };
    if (ntiles > 0) load(0, 0);
    const int q0 = qt * FA_BQ + warp * 16;  // the warp's first query row
    const int r0 = min(q0 + gr, t - 1), r1 = min(q0 + gr + 8, t - 1);
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int c = 0; c < D / 16; c++) {
        qa[c][0] = *reinterpret_cast<const uint32_t*>(qb + (size_t)r0 * D + c * 16 + 2 * tq);
        qa[c][1] = *reinterpret_cast<const uint32_t*>(qb + (size_t)r1 * D + c * 16 + 2 * tq);
        qa[c][2] = *reinterpret_cast<const uint32_t*>(qb + (size_t)r0 * D + c * 16 + 2 * tq + 8);
        qa[c][3] = *reinterpret_cast<const uint32_t*>(qb + (size_t)r1 * D + c * 16 + 2 * tq + 8);
    }
    float o[D / 8][4];
#pragma unroll
    for (int d = 0; d < D / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const int mat = lane >> 3, mr = lane & 7;  // the ldmatrix row this lane addresses
    for (int tile = 0; tile < ntiles; tile++) {
        const int stage = tile & 1;
        if (tile + 1 < ntiles) {
            load(tile + 1, stage ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // this tile's keys and values are in
        const T* ks = sk + stage * FA_BK * LD;
        const T* vs = sv + stage * FA_BK * LD;
        const int k0 = tile * FA_BK;
        // scores of the warp's 16 rows x 64 keys: s[j] holds keys k0 + 8j + 2tq + {0, 1} of rows
        // gr (elements 0, 1) and gr + 8 (elements 2, 3)
        float s[FA_BK / 8][4];
#pragma unroll
        for (int j = 0; j < FA_BK / 8; j++) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int c = 0; c < D / 16; c += 2) {
                uint32_t bk[4];  // k-steps c (bk[0..1]) and c + 1 (bk[2..3]) of keys 8j..8j+7
                ldsm_x4(bk, ks + (j * 8 + mr) * LD + c * 16 + mat * 8);
                mma16816<T>(s[j], qa[c], bk);
                mma16816<T>(s[j], qa[c + 1], bk + 2);
            }
        }
        online_softmax<FA_BK / 8, D / 8, false>(&s[0][0], &o[0][0], m, l, scale, true, k0, past + q0 + gr, L, tq);
        // o += p v: the score fragments of two key blocks are the A fragment of 16 keys; V's B
        // fragments (16 keys x 8 dimensions, two dimension tiles per ldmatrix) transposed on load
#pragma unroll
        for (int kc = 0; kc < FA_BK / 16; kc++) {
            uint32_t pa[4];
            pa[0] = pack2<T>(s[2 * kc][0], s[2 * kc][1]);
            pa[1] = pack2<T>(s[2 * kc][2], s[2 * kc][3]);
            pa[2] = pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]);
            pa[3] = pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
            for (int d = 0; d < D / 8; d += 2) {
                uint32_t bv[4];
                ldsm_x4_t(bv, vs + (kc * 16 + (mat & 1) * 8 + mr) * LD + (d + (mat >> 1)) * 8);
                mma16816<T>(o[d], pa, bv);
                mma16816<T>(o[d + 1], pa, bv + 2);
            }
        }
        __syncthreads();  // every warp is done with this stage before it is loaded again
    }
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        const int row = q0 + gr + 8 * rr;
        if (row >= t) continue;
        const float inv = 1.f / l[rr];
        // PAGED: [t, heads, D] (the attention output's rows, ready for the dense projection)
        T* orow = PAGED ? out + ((size_t)row * heads + h) * D : out + ((size_t)(b * heads + h) * t + row) * D;
#pragma unroll
        for (int d = 0; d < D / 8; d++)
            *reinterpret_cast<uint32_t*>(orow + d * 8 + 2 * tq) = pack2<T>(o[d][2 * rr] * inv, o[d][2 * rr + 1] * inv);
    }
}

#define FLASH(T, NAME, D)                                                                              \
    extern "C" __global__ void __launch_bounds__(128, 3) flash_prefill_##NAME##_d##D(                     \
        const T* q, const T* k, const T* v, T* out, int t, int L, int past, int heads, int groups,     \
        long long k_bs, long long k_gs, long long v_bs, long long v_gs, float scale) {                 \
        const SeqInfo none = {};                                                                       \
        flash_prefill<T, D, false>(q, k, v, out, t, L, past, heads, groups, k_bs, k_gs, v_bs, v_gs,    \
                                   scale, none);                                                       \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128, 3) flash_prefill_paged_##NAME##_d##D(               \
        const T* q, T* out, const __grid_constant__ SeqInfo seq, int t, int heads, int groups,         \
        float scale) {                                                                                 \
        flash_prefill<T, D, true>(q, nullptr, nullptr, out, t, seq.len + t, seq.len, heads, groups, 0, \
                                  0, 0, 0, scale, seq);                                                \
    }
FLASH(__nv_bfloat16, bf16, 64) FLASH(__nv_bfloat16, bf16, 128) FLASH(__half, f16, 64) FLASH(__half, f16, 128)

#include "flash_wgmma.cuh"

// prefill_qkv: the projections of a prompt (or a chunk) made ready for the paged flash kernel in
// one pass: row i of qkv ([t, (heads + 2 groups) * head_dim], bias not yet added) is the token at
// cache position seq.len + i and rotary position seq.rot + i; bias added and rounded to T, then
// the rotary pairs of queries and keys turned in float32 and rounded again (as decode_attention
// does), queries stored [heads, t, head_dim] for the flash kernel, keys and values straight into
// the sequence's blocks. Grid (t), 256 threads, a pair of elements each.
template <typename T>
__device__ void prefill_qkv(const T* __restrict__ qkv, const T* __restrict__ bias, const T* __restrict__ cos_t,
                            const T* __restrict__ sin_t, T* __restrict__ q_out, const SeqInfo& seq, int t,
                            int heads, int groups, int head_dim, int rot_half) {
    const int i = blockIdx.x;
    const int width = (heads + 2 * groups) * head_dim;
    const T* row = qkv + (size_t)i * width;
    const size_t pos = (size_t)(seq.rot + i) * rot_half;
    for (int p = threadIdx.x; p < width / 2; p += blockDim.x) {
        const int e = 2 * p, which = e / head_dim, col = e % head_dim;
        float x0 = to_f(from_f<T>(to_f(row[e]) + (bias ? to_f(bias[e]) : 0.f)));
        float x1 = to_f(from_f<T>(to_f(row[e + 1]) + (bias ? to_f(bias[e + 1]) : 0.f)));
        if (which < heads + groups && col < 2 * rot_half) {
            const float c = to_f(cos_t[pos + col / 2]), sn = to_f(sin_t[pos + col / 2]);
            const float y0 = x0 * c - x1 * sn;
            const float y1 = x0 * sn + x1 * c;
            x0 = y0;
            x1 = y1;
        }
        T* dst;
        if (which < heads)
            dst = q_out + ((size_t)which * t + i) * head_dim + col;
        else if (which < heads + groups)
            dst = kv_at<T>(seq.k, seq, seq.len + i, which - heads, groups, head_dim) + col;
        else
            dst = kv_at<T>(seq.v, seq, seq.len + i, which - heads - groups, groups, head_dim) + col;
        dst[0] = from_f<T>(x0);
        dst[1] = from_f<T>(x1);
    }
}
#define PREFILL_QKV(T, NAME)                                                                           \
    extern "C" __global__ void prefill_qkv_##NAME(const T* qkv, const T* bias, const T* cos_t,         \
                                                  const T* sin_t, T* q_out,                            \
                                                  const __grid_constant__ SeqInfo seq, int t, int heads, \
                                                  int groups, int head_dim, int rot_half) {            \
        prefill_qkv<T>(qkv, bias, cos_t, sin_t, q_out, seq, t, heads, groups, head_dim, rot_half);    \
    }
PREFILL_QKV(__half, f16) PREFILL_QKV(__nv_bfloat16, bf16)

// ---------------------------------------------------------------------------------------------
// Official weight-only int8/int4 (ChatGLM2's quantization_bit): q [n, k] int8 or [n, k/2] with
// column 2j in the high nibble and 2j+1 in the low one; scale [n] float32; value = scale * q.
// In float32 models each weight is rounded to float16 first, as the official dequantization
// (exact parity, `gemv_q_exact`); 16-bit models apply the row scale once to the sum (`gemv_q16`).

template <int BITS>
__device__ __forceinline__ void unpack16(const uint4& qv, float* w) {
    const uint8_t* qb = reinterpret_cast<const uint8_t*>(&qv);
#pragma unroll
    for (int j = 0; j < 16; j++) {
        if (BITS == 8) {
            w[j] = (float)(int8_t)qb[j];
        } else {
            w[2 * j] = (float)((int8_t)qb[j] >> 4);
            w[2 * j + 1] = (float)((int8_t)((uint8_t)(qb[j] << 4)) >> 4);
        }
    }
}

// float32 models: each weight rounded to float16 after scaling, as the official dequantization.
template <int M, int BITS>
__device__ void gemv_q_exact(const float* __restrict__ x, const uint8_t* __restrict__ q,
                             const float* __restrict__ scale, float* __restrict__ y, int n, int k) {
    constexpr int COLS = BITS == 8 ? 16 : 32;  // columns per 16 bytes of q
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    const int rb = BITS == 8 ? k : k / 2;
    const uint8_t* qr = q + (size_t)row * rb;
    const float s = scale[row];
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; m++) acc[m] = 0.f;
#pragma unroll 2
    for (int cb = lane * 16; cb < rb; cb += 32 * 16) {
        const uint4 qv = *reinterpret_cast<const uint4*>(qr + cb);
        float w[COLS];
        unpack16<BITS>(qv, w);
#pragma unroll
        for (int j = 0; j < COLS; j++) w[j] = __half2float(__float2half(s * w[j]));
        const int c0 = BITS == 8 ? cb : 2 * cb;
#pragma unroll
        for (int m = 0; m < M; m++) {
#pragma unroll
            for (int v = 0; v < COLS / 4; v++) {
                const float4 xv = __ldg(reinterpret_cast<const float4*>(x + (size_t)m * k + c0 + v * 4));
                acc[m] += w[4 * v] * xv.x;
                acc[m] += w[4 * v + 1] * xv.y;
                acc[m] += w[4 * v + 2] * xv.z;
                acc[m] += w[4 * v + 3] * xv.w;
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; m++) {
        float v = acc[m];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (lane == 0) y[(size_t)m * n + row] = v;
    }
}

// 16-bit models: the weights become floats without integer-to-float conversions (a quarter-rate
// pipe that bounded the simple kernel at about 1.1 TB/s). A signed field of BITS bits at bit P
// (P + BITS <= 23) of a word w is exactly
//   fma(as_float((w & mask) ^ (sign | 0x4B000000)), 2^-P, -(2^(23-P) + 2^(BITS-1))):
// the xor turns two's complement into offset binary and puts it under the exponent of 2^23.
template <int BITS, int P>
__device__ __forceinline__ float field(uint32_t w) {
    constexpr uint32_t MASK = ((1u << BITS) - 1u) << P;
    constexpr uint32_t XOR = ((1u << (BITS - 1)) << P) | 0x4B000000u;
    constexpr float INV = 1.0f / (float)(1u << P);
    constexpr float OFF = 8388608.0f / (float)(1u << P) + (float)(1u << (BITS - 1));
    return fmaf(__uint_as_float((w & MASK) ^ XOR), INV, -OFF);
}

// The columns of one 32-bit word of q: int4 byte j holds column 2j in its high nibble and 2j+1
// in its low one; int8 byte j is column j.
template <int BITS>
__device__ __forceinline__ void unpack_word(uint32_t w, float* f) {
    const uint32_t h = w >> 16;
    if (BITS == 4) {
        f[0] = field<4, 4>(w);
        f[1] = field<4, 0>(w);
        f[2] = field<4, 12>(w);
        f[3] = field<4, 8>(w);
        f[4] = field<4, 4>(h);
        f[5] = field<4, 0>(h);
        f[6] = field<4, 12>(h);
        f[7] = field<4, 8>(h);
    } else {
        f[0] = field<8, 0>(w);
        f[1] = field<8, 8>(w);
        f[2] = field<8, 0>(h);
        f[3] = field<8, 8>(h);
    }
}

// Weights are read once per step: load them without allocating in L1, which keeps x there.
__device__ __forceinline__ uint32_t load_stream(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ uint2 load_stream(const uint2* p) {
    uint2 v;
    asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

// 8 consecutive 16-bit values of x as floats (one 16-byte load).
template <typename T>
__device__ __forceinline__ void load_x8(const T* p, float* f) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int j = 0; j < 8; j++) f[j] = to_f(e[j]);
}

// The packed bytes of 8 columns: one word (int4) or two (int8).
template <int BITS> struct Packed8;
template <> struct Packed8<4> {
    using T = uint32_t;
    static __device__ __forceinline__ void unpack(T w, float* f) { unpack_word<4>(w, f); }
};
template <> struct Packed8<8> {
    using T = uint2;
    static __device__ __forceinline__ void unpack(T w, float* f) {
        unpack_word<8>(w.x, f);
        unpack_word<8>(w.y, f + 4);
    }
};

// The epilogue of the int8/int4 GEMVs: each of the warp's R rows (those below n) summed over the
// lanes, times its row scale, stored for each of the M inputs by lane 0.
template <typename T, int M, int R>
__device__ __forceinline__ void store_rows(const float (&acc)[M][R], const float* __restrict__ scale,
                                           T* __restrict__ y, int n, int row0, int lane) {
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (row0 + r >= n) break;
        const float s = scale[row0 + r];
#pragma unroll
        for (int m = 0; m < M; m++) {
            float v = acc[m][r];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
            if (lane == 0) y[(size_t)m * n + row0 + r] = from_f<T>(v * s);
        }
    }
}

// Lane l takes columns 8l..8l+7 of each 256-column step, so the warp's x loads are contiguous
// 16-byte pieces (a lane reading 32 columns of x at a 64-byte stride made L1 the bottleneck)
// and its weight loads are contiguous too. Each warp computes R rows, so every x value read and
// converted serves R rows; U steps are loaded before any is used, to keep bytes in flight.
// Float32 accumulation; the row scale is applied once to the sum.
// SWIGLU (M = 1, R = 2): warp j takes the gate row j and the up row j + n/2 of dense_h_to_4h and
// writes swiglu(gate, up) to y[j] (what this kernel then `swiglu` would give, in one launch).
template <typename T, int M, int BITS, int R, bool SWIGLU = false>
__device__ void gemv_q16(const T* __restrict__ x, const uint8_t* __restrict__ q, const float* __restrict__ scale,
                         T* __restrict__ y, int n, int k) {
    using P = Packed8<BITS>;
    using W = typename P::T;
    constexpr int U = BITS == 4 ? 8 : 4;
    static_assert(!SWIGLU || (M == 1 && R == 2), "SwiGLU pairs one gate and one up row");
    const int lane = threadIdx.x & 31;
    const int warp = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int row0 = SWIGLU ? warp : warp * R;
    if (SWIGLU ? warp >= n / 2 : row0 >= n) return;
    int rows[R];
#pragma unroll
    for (int r = 0; r < R; r++) rows[r] = SWIGLU ? warp + r * (n / 2) : min(row0 + r, n - 1);
    const W* qr[R];  // 8 columns per element
#pragma unroll
    for (int r = 0; r < R; r++) qr[r] = reinterpret_cast<const W*>(q + (size_t)rows[r] * (k * BITS / 8));
    float acc[M][R];
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[m][r] = 0.f;
    for (int c0 = lane * 8; c0 < k; c0 += 256 * U) {
        W qv[U][R];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + u * 256;
#pragma unroll
            for (int r = 0; r < R; r++) qv[u][r] = c < k ? load_stream(qr[r] + c / 8) : W{};
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + u * 256;
            if (c >= k) break;
            float wf[R][8];
#pragma unroll
            for (int r = 0; r < R; r++) P::unpack(qv[u][r], wf[r]);
#pragma unroll
            for (int m = 0; m < M; m++) {
                float xf[8];
                load_x8<T>(x + (size_t)m * k + c, xf);
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int j = 0; j < 8; j++) acc[m][r] = fmaf(wf[r][j], xf[j], acc[m][r]);
            }
        }
    }
    if constexpr (SWIGLU) {
        float v[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            v[r] = acc[0][r];
            for (int o = 16; o > 0; o >>= 1) v[r] += __shfl_xor_sync(0xffffffff, v[r], o);
        }
        if (lane == 0) y[warp] = swiglu_pair<T>(v[0] * scale[rows[0]], v[1] * scale[rows[1]]);
    } else {
        store_rows<T, M, R>(acc, scale, y, n, row0, lane);
    }
}

// Integer path for 16-bit models (the default): x is quantized to int8 per group of 8 columns
// (scale max|x|/127, round to nearest) by `quantize_x`, and the GEMV multiplies bytes with dp4a:
// about 7 instructions per 8 int4 weights instead of 3 per weight in float (which made the float
// kernel compute-bound at ~1.8 TB/s). One 16-byte record per group: two words of int8 x in the
// order the weight bytes are unpacked, the group scale, and the offset term.
//   int4: the nibbles become offset binary u = v + 8 (xor 0x8 per nibble); low nibbles are the odd
//         columns, high nibbles the even ones, so a = (x1, x3, x5, x7), b = (x0, x2, x4, x6) and
//         off = -8 * sum(xq) removes the offset from the integer sum.
//   int8: the weight bytes are signed already: a = (x0..x3), b = (x4..x7), off = 0.
template <typename T, int BITS>
__device__ void quantize_x(const T* __restrict__ x, int4* __restrict__ xq, int groups) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= groups) return;
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(x) + i);
    const T* e = reinterpret_cast<const T*>(&v);
    float f[8], amax = 0.f;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        f[j] = to_f(e[j]);
        amax = fmaxf(amax, fabsf(f[j]));
    }
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    int qv[8], sum = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        qv[j] = __float2int_rn(f[j] * inv);
        sum += qv[j];
    }
    auto pack = [](int b0, int b1, int b2, int b3) {
        return (b0 & 0xFF) | ((b1 & 0xFF) << 8) | ((b2 & 0xFF) << 16) | ((uint32_t)(b3 & 0xFF) << 24);
    };
    int4 rec;
    if (BITS == 4) {
        rec.x = pack(qv[1], qv[3], qv[5], qv[7]);
        rec.y = pack(qv[0], qv[2], qv[4], qv[6]);
        rec.w = -8 * sum;
    } else {
        rec.x = pack(qv[0], qv[1], qv[2], qv[3]);
        rec.y = pack(qv[4], qv[5], qv[6], qv[7]);
        rec.w = 0;
    }
    rec.z = __float_as_int(amax / 127.f);
    xq[i] = rec;
}

// y[m, n] = scale[n] * sum over groups of d_g * (integer dot of group g): lane l takes group l of
// each 32-group step (contiguous weight words and x records across the warp); R rows per warp;
// U steps loaded before use.
template <typename T, int M, int BITS, int R>
__device__ void gemv_dp4a(const int4* __restrict__ xq, const uint8_t* __restrict__ q, const float* __restrict__ scale,
                          T* __restrict__ y, int n, int k) {
    using W = typename Packed8<BITS>::T;
    constexpr int U = BITS == 4 ? 8 : 4;
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
    if (row0 >= n) return;
    const int groups = k / 8;
    const W* qr[R];
#pragma unroll
    for (int r = 0; r < R; r++) qr[r] = reinterpret_cast<const W*>(q + (size_t)min(row0 + r, n - 1) * (k * BITS / 8));
    float acc[M][R];
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[m][r] = 0.f;
    for (int g0 = lane; g0 < groups; g0 += 32 * U) {
        W qv[U][R];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int g = g0 + u * 32;
#pragma unroll
            for (int r = 0; r < R; r++) qv[u][r] = g < groups ? load_stream(qr[r] + g) : W{};
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int g = g0 + u * 32;
            if (g >= groups) break;
            int lo[R], hi[R];
#pragma unroll
            for (int r = 0; r < R; r++) {
                if constexpr (BITS == 4) {
                    lo[r] = (qv[u][r] ^ 0x88888888u) & 0x0F0F0F0Fu;
                    hi[r] = ((qv[u][r] >> 4) ^ 0x08888888u) & 0x0F0F0F0Fu;
                } else {
                    lo[r] = qv[u][r].x;
                    hi[r] = qv[u][r].y;
                }
            }
#pragma unroll
            for (int m = 0; m < M; m++) {
                const int4 rec = __ldg(xq + (size_t)m * groups + g);
                const float d = __int_as_float(rec.z);
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const int sum = __dp4a(hi[r], rec.y, __dp4a(lo[r], rec.x, rec.w));
                    acc[m][r] = fmaf(d, (float)sum, acc[m][r]);
                }
            }
        }
    }
    store_rows<T, M, R>(acc, scale, y, n, row0, lane);
}

// The dense weight [n, k] (prefill: a matmul follows): one thread per 16 bytes of q (rows are
// multiples of 16 bytes, so a piece never crosses rows), written as 16-byte vectors.
template <typename T, int BITS>
__device__ void dequant_q(const uint8_t* __restrict__ q, const float* __restrict__ scale, T* __restrict__ out,
                          int n, int k) {
    constexpr int COLS = BITS == 8 ? 16 : 32;  // columns per 16 bytes of q
    const size_t rb = BITS == 8 ? k : k / 2;
    const size_t pieces = (size_t)n * rb / 16;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < pieces; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i * 16 / rb;
        const float s = scale[r];
        float w[COLS];
        unpack16<BITS>(*reinterpret_cast<const uint4*>(q + i * 16), w);
        __align__(16) T o[COLS];
#pragma unroll
        for (int j = 0; j < COLS; j++) o[j] = from_f<T>(__half2float(__float2half(s * w[j])));
        uint4* dst = reinterpret_cast<uint4*>(out + r * k + (i * 16 - r * rb) * COLS / 16);
#pragma unroll
        for (int v = 0; v < (int)(COLS * sizeof(T) / 16); v++) dst[v] = reinterpret_cast<const uint4*>(o)[v];
    }
}

#define GEMVQ(T, NAME, M, BITS)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                  \
        gemv_q##BITS##_##M##_##NAME(const T* x, const uint8_t* q, const float* s, T* y, int n, int k) { \
        gemv_q_exact<M, BITS>(x, q, s, y, n, k);                                                       \
    }
#define GEMVQ16(T, NAME, M, BITS, R)                                                                   \
    extern "C" __global__ void __launch_bounds__(256) gemv_q##BITS##_##M##_##NAME##_r##R(              \
        const T* x, const uint8_t* q, const float* s, T* y, int n, int k) {                            \
        gemv_q16<T, M, BITS, R>(x, q, s, y, n, k);                                                     \
    }
#define GEMVQ16_M(T, NAME, BITS, R)                                                                    \
    GEMVQ16(T, NAME, 1, BITS, R) GEMVQ16(T, NAME, 2, BITS, R) GEMVQ16(T, NAME, 3, BITS, R)              \
    GEMVQ16(T, NAME, 4, BITS, R) GEMVQ16(T, NAME, 5, BITS, R) GEMVQ16(T, NAME, 6, BITS, R)              \
    GEMVQ16(T, NAME, 7, BITS, R) GEMVQ16(T, NAME, 8, BITS, R)
#define DEQUANT(T, NAME, BITS)                                                                         \
    extern "C" __global__ void dequant_q##BITS##_##NAME(const uint8_t* q, const float* s, T* out, int n, int k) { \
        dequant_q<T, BITS>(q, s, out, n, k);                                                           \
    }
// float32 models: the exact kernel (one row per warp).
#define INSTANTIATE_F32(BITS)                                                                          \
    GEMVQ(float, f32, 1, BITS) GEMVQ(float, f32, 2, BITS) GEMVQ(float, f32, 3, BITS)                   \
    GEMVQ(float, f32, 4, BITS) GEMVQ(float, f32, 5, BITS) GEMVQ(float, f32, 6, BITS)                   \
    GEMVQ(float, f32, 7, BITS) GEMVQ(float, f32, 8, BITS) DEQUANT(float, f32, BITS)
#define DP4A(T, NAME, M, BITS, R)                                                                      \
    extern "C" __global__ void __launch_bounds__(256) gemv_dp4a_q##BITS##_##M##_##NAME##_r##R(         \
        const int4* xq, const uint8_t* q, const float* s, T* y, int n, int k) {                        \
        gemv_dp4a<T, M, BITS, R>(xq, q, s, y, n, k);                                                   \
    }
#define DP4A_M(T, NAME, BITS, R)                                                                       \
    DP4A(T, NAME, 1, BITS, R) DP4A(T, NAME, 2, BITS, R) DP4A(T, NAME, 3, BITS, R)                      \
    DP4A(T, NAME, 4, BITS, R) DP4A(T, NAME, 5, BITS, R) DP4A(T, NAME, 6, BITS, R)                      \
    DP4A(T, NAME, 7, BITS, R) DP4A(T, NAME, 8, BITS, R)
// 16-bit models: the integer kernels (rows per warp 1, 2 or 4: GLM2RS_GEMVQ_ROWS) and the float
// ones (GLM2RS_GEMVQ=float; see src/kernels/cuda.rs).
#define INSTANTIATE_16(T, NAME, BITS)                                                                  \
    GEMVQ16_M(T, NAME, BITS, 2)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) gemv_q##BITS##_1_##NAME##_swiglu(                \
        const T* x, const uint8_t* q, const float* s, T* y, int n, int k) {                            \
        gemv_q16<T, 1, BITS, 2, true>(x, q, s, y, n, k);                                               \
    }                                                                                                  \
    DP4A_M(T, NAME, BITS, 1) DP4A_M(T, NAME, BITS, 2) DP4A_M(T, NAME, BITS, 4)                         \
    extern "C" __global__ void quantize_x##BITS##_##NAME(const T* x, int4* xq, int groups) {            \
        quantize_x<T, BITS>(x, xq, groups);                                                            \
    }                                                                                                  \
    DEQUANT(T, NAME, BITS)

INSTANTIATE_F32(8)
INSTANTIATE_F32(4)
INSTANTIATE_16(__half, f16, 8)
INSTANTIATE_16(__half, f16, 4)
INSTANTIATE_16(__nv_bfloat16, bf16, 8)
INSTANTIATE_16(__nv_bfloat16, bf16, 4)
