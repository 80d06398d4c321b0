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
