//! With the `cuda` feature, compile src/kernels/cuda/*.cu to PTX with nvcc (NVCC or nvcc on
//! PATH; CUDA_COMPUTE_CAP picks the target, default 90). The PTX is embedded in the library.
//! Compute capability 90 targets compute_90a (Hopper's wgmma, for the flash_wgmma prompt kernel)
//! and sets `cfg(glm2rs_wgmma)`, which lets the launcher pick that kernel on a 9.0 device.

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
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("glm2.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    // arch-specific PTX (sm_90a) runs on compute capability 9.0 only: the wgmma kernels need it
    let arch = if cap == "90" {
        println!("cargo:rustc-cfg=glm2rs_wgmma");
        "90a".to_string()
    } else {
        cap
    };
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "--use_fast_math", "-std=c++17"])
        .arg(format!("-arch=compute_{arch}"))
        .arg("-o")
        .arg(&out)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} (set NVCC): {e}"));
    assert!(status.success(), "{nvcc} failed on {src}");
}
