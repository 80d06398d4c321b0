//! Criterion benches of the hot kernels on chatglm2-6b shapes:
//! `cargo bench --bench kernels` (add `-- --quick` for a short run). With `--features cuda`
//! the GPU kernels too (`-- gpu_` selects them; `scripts/build_wheel.sh --cuda --bench` builds the
//! binary here to run on the GPU machine).

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glm2rs::kernels::cpu_gemv::Gemv;

fn gemv(c: &mut Criterion) {
    let dev = Device::Cpu;
    // (name, out, in): dense_h_to_4h and dense_4h_to_h of chatglm2-6b
    for (name, n, k) in [("h_to_4h", 27392usize, 4096usize), ("4h_to_h", 4096, 13696)] {
        for dt in [DType::F16, DType::BF16] {
            let w = Tensor::randn(0f32, 0.02, (n, k), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let x = Tensor::randn(0f32, 1.0, (1, k), &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let mut g = c.benchmark_group(format!("gemv_{name}_{dt:?}"));
            g.throughput(Throughput::Bytes((n * k * 2) as u64));
            g.sample_size(20);
            g.bench_function("glm2rs", |b| {
                b.iter(|| x.apply_op2_no_bwd(&w, &Gemv).unwrap())
            });
            if dt == DType::F16 {
                g.bench_function("candle_matmul", |b| {
                    b.iter(|| x.matmul(&w.t().unwrap()).unwrap())
                });
            }
            g.finish();
        }
    }
}

#[cfg(not(feature = "cuda"))]
criterion_group!(benches, gemv, quant);
#[cfg(feature = "cuda")]
criterion_group!(benches, gemv, quant, gpu::gpu);
criterion_main!(benches);

fn quant(c: &mut Criterion) {
    use glm2rs::kernels::cpu_quant::QuantMatmul;
    use glm2rs::quantize::Bits;
    let dev = Device::Cpu;
    let (n, k) = (27392usize, 4096usize);
    let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap();
    for (bits, name) in [(Bits::Eight, "int8"), (Bits::Four, "int4")] {
        let (q, s) = glm2rs::quantize::quantize_official(&w, bits).unwrap();
        let mut g = c.benchmark_group(format!("quant_h_to_4h_{name}"));
        g.throughput(Throughput::Bytes(q.elem_count() as u64));
        g.sample_size(10);
        for m in [1usize, 32] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            for exact in [false, true] {
                // GLM2RS_NO_VNNI=1 measures the float kernels
                let op = QuantMatmul {
                    bits,
                    exact,
                    vnni: glm2rs::Tuning::env().vnni,
                };
                g.bench_function(format!("m{m}_exact{exact}"), |b| {
                    b.iter(|| x.apply_op3_no_bwd(&q, &s, &op).unwrap())
                });
            }
        }
        g.finish();
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::{DType, Device, Tensor};
    use criterion::{Criterion, Throughput};
    use glm2rs::kernels::cuda;
    use glm2rs::quantize::Bits;
    use std::time::{Duration, Instant};

    /// GPU time per call: `iters` launches back to back between two synchronizations (one
    /// synchronization per call would time the launch latency, not the kernel).
    fn timed(dev: &Device, iters: u64, mut f: impl FnMut()) -> Duration {
        dev.synchronize().unwrap();
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        dev.synchronize().unwrap();
        t.elapsed()
    }

    pub fn gpu(c: &mut Criterion) {
        let dev = glm2rs::parse_device("cuda").expect("a CUDA device");
        let rand = |shape: (usize, usize), std: f32, dt: DType| {
            Tensor::randn(0f32, std, shape, &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap()
        };
        // (name, out, in): the four projections of a chatglm2-6b layer
        let shapes = [
            ("qkv", 4608usize, 4096usize),
            ("dense", 4096, 4096),
            ("h_to_4h", 27392, 4096),
            ("4h_to_h", 4096, 13696),
        ];
        for (name, n, k) in shapes {
            let w = rand((n, k), 0.02, DType::BF16);
            let wf = w
                .to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            let mut g = c.benchmark_group(format!("gpu_{name}_bf16"));
            g.sample_size(20);
            g.warm_up_time(Duration::from_millis(300));
            g.measurement_time(Duration::from_secs(1));
            for m in [1usize, 8] {
                let x = rand((m, k), 1.0, DType::BF16);
                g.throughput(Throughput::Bytes((n * k * 2) as u64));
                g.bench_function(format!("gemv_m{m}"), |b| {
                    b.iter_custom(|it| {
                        timed(&dev, it, || drop(cuda::gemv(&x, &w).unwrap().unwrap()))
                    })
                });
                g.bench_function(format!("candle_matmul_m{m}"), |b| {
                    b.iter_custom(|it| timed(&dev, it, || drop(x.matmul(&w.t().unwrap()).unwrap())))
                });
            }
            for qb in [Bits::Eight, Bits::Four] {
                let bits = qb.count();
                let (q, s) = glm2rs::quantize::quantize_official(&wf, qb).unwrap();
                let (q, s) = (q.to_device(&dev).unwrap(), s.to_device(&dev).unwrap());
                g.throughput(Throughput::Bytes(q.elem_count() as u64));
                for m in [1usize, 8] {
                    let x = rand((m, k), 1.0, DType::BF16);
                    g.bench_function(format!("int{bits}_gemv_m{m}"), |b| {
                        b.iter_custom(|it| {
                            timed(&dev, it, || {
                                let t = glm2rs::Tuning::env();
                                drop(cuda::gemv_official(&x, &q, &s, qb, &t).unwrap())
                            })
                        })
                    });
                }
                g.bench_function(format!("int{bits}_dequantize"), |b| {
                    b.iter_custom(|it| {
                        timed(&dev, it, || {
                            drop(cuda::dequantize_official(&q, &s, qb, DType::BF16).unwrap())
                        })
                    })
                });
            }
            g.finish();
        }
        let mut g = c.benchmark_group("gpu_add_rmsnorm_bf16");
        g.sample_size(20);
        g.warm_up_time(Duration::from_millis(300));
        g.measurement_time(Duration::from_secs(1));
        let a = rand((1, 4096), 1.0, DType::BF16);
        let r = rand((1, 4096), 1.0, DType::BF16);
        let nw = rand((1, 4096), 1.0, DType::BF16).squeeze(0).unwrap();
        g.bench_function("fused", |b| {
            b.iter_custom(|it| {
                timed(&dev, it, || {
                    drop(cuda::add_rmsnorm(&a, Some(&r), &nw, 1e-5).unwrap())
                })
            })
        });
        g.finish();
    }
}
