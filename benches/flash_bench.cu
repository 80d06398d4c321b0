// The prompt attention kernels alone, on the GPU machine (issue #15): time `flash_wgmma` (and the
// mma.sync `flash_prefill_paged` it replaces on Hopper) on a paged cache of chatglm2-6b's shapes
// (32 query heads, 2 key/value groups, head_dim 128, bfloat16, blocks of 16 positions in shuffled
// order) and check the two agree. Built beside the kernels, no Rust needed:
//
//   nvcc -O3 -std=c++17 --use_fast_math -arch=sm_90a -o /tmp/flash_bench benches/flash_bench.cu -lcuda
//   /tmp/flash_bench 32000 [past] [repeats] [log2 block size] [log2 blocks per slab] [order: 1 shuffled, 0 in order, 2 mixed]
//
// Prints ms per launch (one layer) and TFLOP/s of causal attention (2 * 2 * t * (past + t/2) * 128
// * heads FLOP), and the largest difference between the two kernels' outputs.
#ifndef GLM2_CU  // another copy of the kernels, to time a variant: -DGLM2_CU='"/path/glm2.cu"'
#define GLM2_CU "../src/kernels/cuda/glm2.cu"
#endif
#include GLM2_CU

#include <cuda.h>  // cuTensorMapEncodeTiled: link with -lcuda

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
    const int shift = argc > 4 ? atoi(argv[4]) : 4;  // log2 of the block size
    const int heads = 32, groups = 2, D = 128, bs = 1 << shift;
    const int L = past + t, nblocks = (L + bs - 1) / bs + 1;
    int total_shift = 0;  // the blocks in one allocation, cut into slabs of 2^slab_shift blocks
    while ((1 << total_shift) < nblocks) total_shift++;
    const int slab_shift = argc > 5 ? std::min(atoi(argv[5]), total_shift) : total_shift;
    const int nslabs = 1 << (total_shift - slab_shift);
    const size_t kv_elems = ((size_t)1 << total_shift) * bs * groups * D, slab_elems = kv_elems >> (total_shift - slab_shift);
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
    const int order = argc > 6 ? atoi(argv[6]) : 1;  // 1: shuffled, 0: in order, 2: in order but 1 in 16 swapped
    if (order == 1) std::shuffle(table.begin(), table.end(), rng);
    if (order == 2)
        for (int i = 0; i < nblocks; i += 16) std::swap(table[i], table[rng() % nblocks]);
    uint32_t* dtable;
    uint64_t *kslabs, *vslabs;
    CK(cudaMalloc(&dtable, nblocks * 4));
    CK(cudaMemcpy(dtable, table.data(), nblocks * 4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&kslabs, 8 * nslabs));
    CK(cudaMalloc(&vslabs, 8 * nslabs));
    std::vector<uint64_t> ka(nslabs), va(nslabs);
    for (int i = 0; i < nslabs; i++) {
        ka[i] = (uint64_t)(k + i * slab_elems);
        va[i] = (uint64_t)(v + i * slab_elems);
    }
    CK(cudaMemcpy(kslabs, ka.data(), 8 * nslabs, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(vslabs, va.data(), 8 * nslabs, cudaMemcpyHostToDevice));
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
#ifdef FW_TMA
    // the slab's tensor maps, as kv_pool.rs encodes them: rows of groups * D elements, boxes of
    // 64 x min(block size, 128) and 64 x 128, 128-byte swizzle
    std::vector<CUtensorMap> hmaps(4 * nslabs);  // per slab key, value in blocks, then in boxes of 128
    for (int i = 0; i < 4 * nslabs; i++) {
        const cuuint64_t dims[2] = {(cuuint64_t)groups * D, ((cuuint64_t)1 << slab_shift) * bs};
        const cuuint64_t strides[1] = {(cuuint64_t)groups * D * sizeof(bf)};
        const cuuint32_t box[2] = {64, (cuuint32_t)((i & 2) ? 128 : std::min(bs, 128))}, estr[2] = {1, 1};
        CUresult r = cuTensorMapEncodeTiled(&hmaps[i], CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, (void*)((i & 1) ? va[i / 4] : ka[i / 4]),
                                            dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
        if (r != CUDA_SUCCESS) {
            fprintf(stderr, "cuTensorMapEncodeTiled: %d\n", (int)r);
            return 1;
        }
    }
    void* dmaps;
    CK(cudaMalloc(&dmaps, hmaps.size() * sizeof(CUtensorMap)));
    CK(cudaMemcpy(dmaps, hmaps.data(), hmaps.size() * sizeof(CUtensorMap), cudaMemcpyHostToDevice));
    auto wgmma = [&] {
        flash_wgmma_bf16_d128<<<w_grid, w_threads, w_smem>>>(q, out_w, seq, (uint64_t)dmaps, t, heads, groups, scale);
    };
#else
    auto wgmma = [&] {
        flash_wgmma_bf16_d128<<<w_grid, w_threads, w_smem>>>(q, out_w, seq, t, heads, groups, scale);
    };
#endif
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
