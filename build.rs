//! With the `cuda` feature, compile src/kernels/cuda/glm2.cu with nvcc (NVCC or nvcc on PATH)
//! into a fatbin embedded in the library: machine code for each target, so no process JIT-compiles
//! glm2rs's kernels, and PTX of the newest plain target, which newer GPUs compile once.
//! - `GLM2RS_CUDA_ARCHS`: the targets, e.g. `80,86,89,90a` (the portable wheel: A100, RTX 30/40,
//!   L4, H100/H200; PTX for compute_90 runs on later GPUs);
//! - otherwise `CUDA_COMPUTE_CAP` (default 90): that one target, 90 as 90a.
//!
//! `90a` (Hopper's wgmma, for the flash_wgmma prompt kernel; its code runs on compute capability
//! 9.0 only) sets `cfg(glm2rs_wgmma)`, which lets the launcher pick that kernel on a 9.0 device.
//! The oldest target is the library's minimum compute capability (`GLM2RS_MIN_CC`).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(glm2rs_wgmma)");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let src = "src/kernels/cuda/glm2.cu";
    println!("cargo:rerun-if-changed=src/kernels/cuda");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=GLM2RS_CUDA_ARCHS");
    let archs: Vec<String> = match std::env::var("GLM2RS_CUDA_ARCHS") {
        Ok(list) => list
            .split(',')
            .map(|a| a.trim().trim_start_matches("sm_").to_string())
            .filter(|a| !a.is_empty())
            .collect(),
        Err(_) => {
            let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
            vec![if cap == "90" { "90a".to_string() } else { cap }]
        }
    };
    let number = |a: &str| -> u32 {
        a.trim_end_matches(['a', 'f']).parse().unwrap_or_else(|_| {
            panic!("GLM2RS_CUDA_ARCHS: {a:?} is not a compute capability like 80 or 90a")
        })
    };
    assert!(!archs.is_empty(), "GLM2RS_CUDA_ARCHS is empty");
    if archs.iter().any(|a| a == "90a") {
        println!("cargo:rustc-cfg=glm2rs_wgmma");
    }
    let min = archs.iter().map(|a| number(a)).min().unwrap();
    println!("cargo:rustc-env=GLM2RS_MIN_CC={min}");
    let out =
        std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("glm2.fatbin");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let mut cmd = std::process::Command::new(&nvcc);
    cmd.args(["--fatbin", "-O3", "--use_fast_math", "-std=c++17"]);
    for a in &archs {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    // PTX of the newest target that is not architecture-specific (an `a` target's PTX runs on
    // that exact compute capability only)
    // (a build for the GPU at hand, without GLM2RS_CUDA_ARCHS, needs none)
    if std::env::var_os("GLM2RS_CUDA_ARCHS").is_some() {
        let newest = archs.iter().map(|a| number(a)).max().unwrap();
        cmd.arg(format!(
            "-gencode=arch=compute_{newest},code=compute_{newest}"
        ));
    }
    if archs.len() > 1 {
        cmd.arg(format!("--threads={}", archs.len().min(4)));
    }
    let status = cmd
        .arg("-o")
        .arg(&out)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} (set NVCC): {e}"));
    assert!(status.success(), "{nvcc} failed on {src}");
}
