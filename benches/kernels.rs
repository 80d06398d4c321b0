//! Criterion benches of the hot CPU kernels on chatglm2-6b shapes:
//! `cargo bench --bench kernels` (add `-- --quick` for a short run).

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

criterion_group!(benches, gemv, quant);
criterion_main!(benches);

fn quant(c: &mut Criterion) {
    use glm2rs::kernels::cpu_quant::{Bits, QuantMatmul};
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
                let op = QuantMatmul { bits, exact };
                g.bench_function(format!("m{m}_exact{exact}"), |b| {
                    b.iter(|| x.apply_op3_no_bwd(&q, &s, &op).unwrap())
                });
            }
        }
        g.finish();
    }
}
