#!/usr/bin/env python3
"""Assemble a CUDA 13.0 toolkit from NVIDIA's PyPI wheels into cuda/13.0/.

    python3 scripts/cuda_toolkit.py          # or: make cuda-toolkit

Why 13.0 and these wheels: the CUDA 12 `nvidia-cuda-nvcc-cu12` wheels carry
no `nvcc` binary (only ptxas and libnvvm), while the CUDA 13 wheels install
into one `nvidia/cu13/` prefix that is a working toolkit (nvcc, cicc, ptxas,
headers, CCCL). 13.0 matches driver 580 on the GPU machines kefu targets:
candle loads its kernels as PTX, and PTX from a newer nvcc does not load on
an older driver; mistral.rs 0.8.1 refuses CUDA >= 13.3 anyway.

What it builds, besides unpacking (every wheel is pinned by sha256):
- unversioned lib*.so links the linker needs (libcudart.so -> .so.13, ...);
- lib/stubs/libcuda.so: a link-time stub of the driver API (no wheel ships
  libcuda; at run time the GPU machine's driver provides libcuda.so.1);
- bin/nvcc wrapped so every object compile (`-c`) also emits sm_90a code:
  kefu's GPU build sets CUDA_COMPUTE_CAP=80 (A100), candle's PTX JITs on
  Hopper, and the wrapper adds Hopper machine code for the static kernel
  libraries of mistral.rs, so one binary serves sm_80 and sm_90.
Idempotent: a second run checks the stamp and does nothing.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fetch import FetchError, download, sha256  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEST = os.path.join(ROOT, "cuda", "13.0")
PREFIX = "nvidia/cu13/"

# (pip requirement, wheel file name, sha256)
WHEELS = [
    ("nvidia-cuda-nvcc==13.0.88",
     "nvidia_cuda_nvcc-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
     "56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03"),
    ("nvidia-nvvm==13.0.88",
     "nvidia_nvvm-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl",
     "c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0"),
    ("nvidia-cuda-crt==13.0.88",
     "nvidia_cuda_crt-13.0.88-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
     "2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4"),
    ("nvidia-cuda-runtime==13.0.96",
     "nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
     "7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548"),
    ("nvidia-cuda-cccl==13.0.85",
     "nvidia_cuda_cccl-13.0.85-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
     "e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649"),
    ("nvidia-cuda-nvrtc==13.0.88",
     "nvidia_cuda_nvrtc-13.0.88-py3-none-manylinux2010_x86_64.manylinux_2_12_x86_64.whl",
     "ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575"),
    ("nvidia-curand==10.4.0.35",
     "nvidia_curand-10.4.0.35-py3-none-manylinux_2_27_x86_64.whl",
     "1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc"),
    ("nvidia-cublas==13.1.0.3",
     "nvidia_cublas-13.1.0.3-py3-none-manylinux_2_27_x86_64.whl",
     "ee8722c1f0145ab246bccb9e452153b5e0515fd094c3678df50b2a0888b8b171"),
]

STAMP = os.path.join(DEST, ".kefu-toolkit")
STAMP_TEXT = "\n".join(w[2] for w in WHEELS) + "\n"

NVCC_WRAPPER = """#!/bin/sh
# kefu: object compiles (-c) also get Hopper (sm_90a) machine code; PTX
# compiles (--ptx) stay single-architecture, as nvcc requires.
here=$(dirname "$0")
case " $* " in
  *" -c "*) exec "$here/nvcc.real" "$@" -gencode=arch=compute_90a,code=sm_90a ;;
  *) exec "$here/nvcc.real" "$@" ;;
esac
"""


def unpack(wheel):
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if not info.filename.startswith(PREFIX) or info.is_dir():
                continue
            rel = info.filename[len(PREFIX):]
            dest = os.path.join(DEST, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(dest, mode if mode else 0o644)


def link_unversioned(lib):
    """libfoo.so.13 -> libfoo.so, for the linker."""
    for path in glob.glob(os.path.join(lib, "lib*.so.*")):
        name = os.path.basename(path)
        base = re.sub(r"\.so\..*$", ".so", name)
        link = os.path.join(lib, base)
        if not os.path.exists(link):
            os.symlink(name, link)


def cuda_stub(lib):
    """A libcuda.so exporting the driver API cudarc links against."""
    registry = os.path.expanduser("~/.cargo/registry/src")
    sources = sorted(glob.glob(os.path.join(registry, "*", "cudarc-*", "src", "driver", "sys", "mod.rs")))
    names = set()
    for src in sources:
        with open(src, encoding="utf-8") as f:
            names.update(re.findall(r"pub (?:unsafe )?fn (cu\w+)", f.read()))
    if not names:
        raise FetchError("no cudarc sources in ~/.cargo/registry: run `cargo fetch` first")
    stubs = os.path.join(lib, "stubs")
    os.makedirs(stubs, exist_ok=True)
    c = os.path.join(stubs, "cuda_stub.c")
    with open(c, "w") as f:
        f.write("/* Link-time stand-in for the NVIDIA driver; never loaded at run time. */\n")
        for n in sorted(names):
            f.write(f"int {n}(void) {{ return 999; }}\n")
    out = os.path.join(stubs, "libcuda.so")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", out, c], check=True)
    return len(names)


def main():
    if os.path.exists(STAMP) and open(STAMP).read() == STAMP_TEXT:
        print(f"cuda-toolkit: {DEST} already in place")
        return 0
    shutil.rmtree(DEST, ignore_errors=True)
    os.makedirs(DEST)
    for requirement, filename, digest in WHEELS:
        wheel = download(requirement, filename, digest)
        print(f"cuda-toolkit: unpacking {filename}", flush=True)
        unpack(wheel)
    lib = os.path.join(DEST, "lib")
    link_unversioned(lib)
    n = cuda_stub(lib)
    nvcc = os.path.join(DEST, "bin", "nvcc")
    os.rename(nvcc, nvcc + ".real")
    with open(nvcc, "w") as f:
        f.write(NVCC_WRAPPER)
    os.chmod(nvcc, 0o755)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    with open(STAMP, "w") as f:
        f.write(STAMP_TEXT)
    print(f"cuda-toolkit: {DEST} ready ({n} driver symbols stubbed)")
    print(version.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FetchError, subprocess.CalledProcessError, OSError) as e:
        print(f"cuda-toolkit: {e}", file=sys.stderr)
        sys.exit(1)
