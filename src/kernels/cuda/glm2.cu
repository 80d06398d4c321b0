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

// Mirrors `SeqInfo` in src/kernels/cuda.rs (#[repr(C)], 32 bytes).
struct SeqInfo {
    uint64_t k;   // this layer's key cache of the sequence: [groups, cap, head_dim]
    uint64_t v;   // value cache, same shape
    int32_t cap;  // positions allocated per group
    int32_t len;  // entries held (a P-Tuning prefix included): the new token goes at `len`
    int32_t rot;  // rotary position of the new token
    int32_t row;  // its row in qkv / out
};

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

    T* kc = reinterpret_cast<T*>(info.k) + (size_t)g * info.cap * head_dim;
    T* vc = reinterpret_cast<T*>(info.v) + (size_t)g * info.cap * head_dim;
    // The first head of the group stores the new key and value; the others use k_s / v_s.
    if (h % r == 0) {
        for (int e = threadIdx.x; e < head_dim; e += blockDim.x) {
            kc[(size_t)info.len * head_dim + e] = from_f<T>(k_s[e]);
            vc[(size_t)info.len * head_dim + e] = from_f<T>(v_s[e]);
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
            const T* kp = kc + (size_t)p * head_dim;
            const T* vp = vc + (size_t)p * head_dim;
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

template <typename T>
__device__ void swiglu(const T* __restrict__ x, T* __restrict__ out, int rows, int f) {
    const size_t n = (size_t)rows * f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t rr = i / f, c = i % f;
        const float a = to_f(x[rr * 2 * f + c]);
        const float b = to_f(x[rr * 2 * f + f + c]);
        // silu rounded to T first, as candle's silu then mul
        const float sa = to_f(from_f<T>(a / (1.f + __expf(-a))));
        out[i] = from_f<T>(sa * b);
    }
}

#define INSTANTIATE(T, NAME)                                                                         \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                         \
        decode_attention_##NAME(const T* qkv, const T* bias, const SeqInfo* seqs, const T* cos_t,    \
                                const T* sin_t, T* out, int heads, int groups, int head_dim,         \
                                int rot_half, float scale) {                                         \
        decode_attention<T>(qkv, bias, seqs, cos_t, sin_t, out, heads, groups, head_dim, rot_half,   \
                            scale);                                                                  \
    }                                                                                                \
    extern "C" __global__ void swiglu_##NAME(const T* x, T* out, int rows, int f) {                  \
        swiglu<T>(x, out, rows, f);                                                                  \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)

// ---------------------------------------------------------------------------------------------
// add_rmsnorm: h = a + b (rounded to T, as candle's add), y = rmsnorm(h) * w (statistics in
// float32, result rounded to T). `b` may be null (plain RMSNorm of a). out: [2, rows, n]
// (h, then y). One block per row.
template <typename T>
__device__ void add_rmsnorm(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ w,
                            T* __restrict__ out, int rows, int n, float eps) {
    const int r = blockIdx.x;
    const T* ar = a + (size_t)r * n;
    const T* br = b ? b + (size_t)r * n : nullptr;
    T* hr = out + (size_t)r * n;
    T* yr = out + (size_t)rows * n + (size_t)r * n;
    // the first 8 elements of each thread stay in registers; the rest (n > 8 * blockDim) is read back
    float hv[8];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        float h = 0.f;
        if (i < n) {
            h = to_f(ar[i]);
            if (br) h = to_f(from_f<T>(h + to_f(br[i])));
            hr[i] = from_f<T>(h);
        }
        hv[j] = h;
        ss += h * h;
    }
    for (int i = threadIdx.x + 8 * blockDim.x; i < n; i += blockDim.x) {
        float h = to_f(ar[i]);
        if (br) h = to_f(from_f<T>(h + to_f(br[i])));
        hr[i] = from_f<T>(h);
        ss += h * h;
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
#pragma unroll
    for (int j = 0; j < 8; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < n) yr[i] = from_f<T>(hv[j] * inv * to_f(w[i]));
    }
    for (int i = threadIdx.x + 8 * blockDim.x; i < n; i += blockDim.x) {
        // reads back what this thread wrote: same thread, same index
        yr[i] = from_f<T>(to_f(hr[i]) * inv * to_f(w[i]));
    }
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

#define GEMV(T, NAME, M)                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                                  \
        gemv##M##_##NAME(const T* x, const T* w, T* y, int n, int k) {                                 \
        gemv<T, M>(x, w, y, n, k);                                                                     \
    }

#define INSTANTIATE2(T, NAME)                                                                          \
    extern "C" __global__ void add_rmsnorm_##NAME(const T* a, const T* b, const T* w, T* out, int rows, \
                                                  int n, float eps) {                                  \
        add_rmsnorm<T>(a, b, w, out, rows, n, eps);                                                    \
    }                                                                                                  \
    extern "C" __global__ void causal_softmax_##NAME(const float* x, T* out, int cols, int tc,         \
                                                     int first_q, float scale) {                       \
        causal_softmax<T>(x, out, cols, tc, first_q, scale);                                           \
    }                                                                                                  \
    GEMV(T, NAME, 1) GEMV(T, NAME, 2) GEMV(T, NAME, 3) GEMV(T, NAME, 4)                               \
    GEMV(T, NAME, 5) GEMV(T, NAME, 6) GEMV(T, NAME, 7) GEMV(T, NAME, 8)

INSTANTIATE2(float, f32)
INSTANTIATE2(__half, f16)
INSTANTIATE2(__nv_bfloat16, bf16)

extern "C" __global__ void argmax_f32(const float* x, uint32_t* out, int n) { argmax_rows(x, out, n); }

// ---------------------------------------------------------------------------------------------
// Official weight-only int8/int4 (ChatGLM2's quantization_bit): q [n, k] int8 or [n, k/2] with
// column 2j in the high nibble and 2j+1 in the low one; scale [n] float32; value = scale * q.
// In float32 models each weight is rounded to float16 first, as the official dequantization
// (exact parity); 16-bit models apply the row scale once to the sum.

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

template <typename T, int M, int BITS>
__device__ void gemv_q(const T* __restrict__ x, const uint8_t* __restrict__ q, const float* __restrict__ scale,
                       T* __restrict__ y, int n, int k) {
    constexpr int V = Vec16<T>::N;
    constexpr int COLS = BITS == 8 ? 16 : 32;  // columns per 16 bytes of q
    constexpr bool EXACT = sizeof(T) == 4;
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
        if (EXACT) {
#pragma unroll
            for (int j = 0; j < COLS; j++) w[j] = __half2float(__float2half(s * w[j]));
        }
        const int c0 = BITS == 8 ? cb : 2 * cb;
#pragma unroll
        for (int m = 0; m < M; m++) {
#pragma unroll
            for (int v = 0; v < COLS / V; v++) {
                const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * k + c0 + v * V));
                const T* xe = reinterpret_cast<const T*>(&xv);
#pragma unroll
                for (int j = 0; j < V; j++) acc[m] += w[v * V + j] * to_f(xe[j]);
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; m++) {
        float v = acc[m];
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (lane == 0) y[(size_t)m * n + row] = from_f<T>(EXACT ? v : v * s);
    }
}

// The dense weight [n, k] (prefill: a matmul follows).
template <typename T, int BITS>
__device__ void dequant_q(const uint8_t* __restrict__ q, const float* __restrict__ scale, T* __restrict__ out,
                          int n, int k) {
    const int rb = BITS == 8 ? k : k / 2;
    const size_t total = (size_t)n * rb;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / rb, c = i % rb;
        const float s = scale[r];
        const int8_t b = (int8_t)q[i];
        if (BITS == 8) {
            out[r * k + c] = from_f<T>(__half2float(__float2half(s * (float)b)));
        } else {
            out[r * k + 2 * c] = from_f<T>(__half2float(__float2half(s * (float)(b >> 4))));
            out[r * k + 2 * c + 1] =
                from_f<T>(__half2float(__float2half(s * (float)((int8_t)((uint8_t)(q[i] << 4)) >> 4))));
        }
    }
}

#define GEMVQ(T, NAME, M, BITS)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                  \
        gemv_q##BITS##_##M##_##NAME(const T* x, const uint8_t* q, const float* s, T* y, int n, int k) { \
        gemv_q<T, M, BITS>(x, q, s, y, n, k);                                                          \
    }
#define INSTANTIATE3(T, NAME, BITS)                                                                    \
    GEMVQ(T, NAME, 1, BITS) GEMVQ(T, NAME, 2, BITS) GEMVQ(T, NAME, 3, BITS) GEMVQ(T, NAME, 4, BITS)    \
    GEMVQ(T, NAME, 5, BITS) GEMVQ(T, NAME, 6, BITS) GEMVQ(T, NAME, 7, BITS) GEMVQ(T, NAME, 8, BITS)    \
    extern "C" __global__ void dequant_q##BITS##_##NAME(const uint8_t* q, const float* s, T* out, int n, int k) { \
        dequant_q<T, BITS>(q, s, out, n, k);                                                           \
    }

INSTANTIATE3(float, f32, 8)
INSTANTIATE3(float, f32, 4)
INSTANTIATE3(__half, f16, 8)
INSTANTIATE3(__half, f16, 4)
INSTANTIATE3(__nv_bfloat16, bf16, 8)
INSTANTIATE3(__nv_bfloat16, bf16, 4)
