"""Write link-time stub libraries for the CUDA libraries candle links dynamically (libcuda,
libnvrtc, libcublas, libcublasLt, libcurand), so that the CUDA wheel links on a machine without
a GPU driver or those libraries. Each stub defines every function cudarc declares for that
library and carries the real soname, so the extension records the real library (DT_NEEDED) and
the loader binds to it on the GPU machine. The stubs are never shipped.

    python scripts/cuda_link_stubs.py OUT_DIR
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

LIBS = {  # cudarc sys module -> (link name, soname)
    "driver": ("cuda", "libcuda.so.1"),
    "nvrtc": ("nvrtc", "libnvrtc.so.13"),
    "cublas": ("cublas", "libcublas.so.13"),
    "cublaslt": ("cublasLt", "libcublasLt.so.13"),
    "curand": ("curand", "libcurand.so.10"),
}


def main() -> None:
    out = os.path.abspath(sys.argv[1])
    os.makedirs(out, exist_ok=True)
    roots = sorted(glob.glob(os.path.expanduser("~/.cargo/registry/src/*/cudarc-0.19.*")))
    if not roots:
        raise SystemExit("cudarc sources not found: run `cargo fetch` first")
    root = roots[-1]
    for module, (name, soname) in LIBS.items():
        src = open(os.path.join(root, "src", module, "sys", "mod.rs")).read()
        names = sorted(set(re.findall(r"pub unsafe fn ([A-Za-z_][A-Za-z0-9_]*)\s*\(", src)))
        c = os.path.join(out, f"{name}.c")
        with open(c, "w") as f:
            f.write("".join(f"void {n}(void) {{}}\n" for n in names))
        so = os.path.join(out, f"lib{name}.so")
        subprocess.run(["cc", "-shared", "-fPIC", "-o", so, c, f"-Wl,-soname,{soname}"], check=True)
        print(f"{so}: {len(names)} functions, soname {soname}")


if __name__ == "__main__":
    main()
