// The prompt attention kernels alone, on the GPU machine (issue #15): time `flash_wgmma` (and the
// mma.sync `flash_prefill_paged` it replaces on Hopper) on a paged cache of chatglm2-6b's shapes
// (32 query heads, 2 key/value groups, head_dim 128, bfloat16, blocks of 16 positions in shuffled
// order) and check the two agree. Built beside the kernels, no Rust needed:
//
//   nvcc -O3 -std=c++17 --use_fast_math -arch=sm_90a -o /tmp/flash_bench benches/flash_bench.cu
//   /tmp/flash_bench 32000 [past] [repeats]
//
// Prints ms per launch (one layer) and TFLOP/s of causal attention (2 * 2 * t * (past + t/2) * 128
// * heads FLOP), and the largest difference between the two kernels' outputs.
#ifndef GLM2_CU  // another copy of the kernels, to time a variant: -DGLM2_CU='"/path/glm2.cu"'
#define GLM2_CU "../src/kernels/cuda/glm2.cu"
#endif
#include GLM2_CU

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define CK(x)                                                                                   \
    do {                                                                                        \
        cudaError_t e = (x);                                                                    \
        if (e != cudaSuccess) {                                                                 \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
            exit(1);                                                                            \
        }                                                                                       \
    } while (0)

typedef __nv_bfloat16 bf;

int main(int argc, char** argv) {
    const int t = argc > 1 ? atoi(argv[1]) : 32000;
    const int past = argc > 2 ? atoi(argv[2]) : 0;
    const int reps = argc > 3 ? atoi(argv[3]) : 10;
    const int heads = 32, groups = 2, D = 128, shift = 4, bs = 1 << shift;
    const int L = past + t, nblocks = (L + bs - 1) / bs + 1;
    int slab_shift = 0;
    while ((1 << slab_shift) < nblocks) slab_shift++;
    // one slab per keys / values: [block][position in block][group][D]
    const size_t kv_elems = ((size_t)1 << slab_shift) * bs * groups * D;
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.f, 1.f);
    auto fill = [&](size_t n) {
        std::vector<bf> h(n);
        for (auto& x : h) x = __float2bfloat16(nd(rng));
        bf* d;
        CK(cudaMalloc(&d, n * sizeof(bf)));
        CK(cudaMemcpy(d, h.data(), n * sizeof(bf), cudaMemcpyHostToDevice));
        return d;
    };
    bf* q = fill((size_t)heads * t * D);
    bf* k = fill(kv_elems);
    bf* v = fill(kv_elems);
    std::vector<uint32_t> table(nblocks);
    for (int i = 0; i < nblocks; i++) table[i] = i;
    std::shuffle(table.begin(), table.end(), rng);
    uint32_t* dtable;
    uint64_t *kslabs, *vslabs;
    CK(cudaMalloc(&dtable, nblocks * 4));
    CK(cudaMemcpy(dtable, table.data(), nblocks * 4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&kslabs, 8));
    CK(cudaMalloc(&vslabs, 8));
    uint64_t ka = (uint64_t)k, va = (uint64_t)v;
    CK(cudaMemcpy(kslabs, &ka, 8, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(vslabs, &va, 8, cudaMemcpyHostToDevice));
    SeqInfo seq = {};
    seq.k = (uint64_t)kslabs;
    seq.v = (uint64_t)vslabs;
    seq.blocks = (uint64_t)dtable;
    seq.len = past;
    seq.shift = shift;
    seq.slab_shift = slab_shift;
    bf *out_w, *out_m;
    CK(cudaMalloc(&out_w, (size_t)heads * t * D * sizeof(bf)));
    CK(cudaMalloc(&out_m, (size_t)heads * t * D * sizeof(bf)));
    const float scale = 1.f / sqrtf((float)D);
    const int w_smem = FW_SMEM, m_smem = 2 * 2 * 64 * (D + 8) * 2;
    CK(cudaFuncSetAttribute(flash_wgmma_bf16_d128, cudaFuncAttributeMaxDynamicSharedMemorySize, w_smem));
    CK(cudaFuncSetAttribute(flash_prefill_paged_bf16_d128, cudaFuncAttributeMaxDynamicSharedMemorySize, m_smem));
    cudaFuncAttributes fa;  // its __launch_bounds__: 384 threads (256 in copies before session 12)
    CK(cudaFuncGetAttributes(&fa, flash_wgmma_bf16_d128));
    const int w_threads = fa.maxThreadsPerBlock;
    const dim3 w_grid((t + 127) / 128, heads);
    auto wgmma = [&] {
        flash_wgmma_bf16_d128<<<w_grid, w_threads, w_smem>>>(q, out_w, seq, t, heads, groups, scale);
    };
    auto mma = [&] {
        flash_prefill_paged_bf16_d128<<<dim3((t + 63) / 64, heads), 128, m_smem>>>(q, out_m, seq, t, heads, groups, scale);
    };
    const double flop = 4.0 * t * (past + t / 2.0) * D * heads;
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    auto time = [&](const char* name, auto launch) {
        launch();
        CK(cudaGetLastError());
        CK(cudaDeviceSynchronize());
        CK(cudaEventRecord(a));
        for (int i = 0; i < reps; i++) launch();
        CK(cudaEventRecord(b));
        CK(cudaEventSynchronize(b));
        float ms;
        CK(cudaEventElapsedTime(&ms, a, b));
        ms /= reps;
        printf("%-20s t %6d past %6d: %8.3f ms per layer, %6.1f TFLOP/s\n", name, t, past, ms, flop / ms / 1e9);
    };
    time("flash_wgmma", wgmma);
    time("flash_prefill_paged", mma);
    std::vector<bf> hw((size_t)heads * t * D), hm(hw.size());
    CK(cudaMemcpy(hw.data(), out_w, hw.size() * sizeof(bf), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(hm.data(), out_m, hm.size() * sizeof(bf), cudaMemcpyDeviceToHost));
    double worst = 0;
    for (size_t i = 0; i < hw.size(); i++)
        worst = std::max(worst, (double)fabsf(__bfloat162float(hw[i]) - __bfloat162float(hm[i])));
    printf("max |wgmma - mma.sync| %.3e\n", worst);
    return worst < 5e-2 ? 0 : 1;
}
