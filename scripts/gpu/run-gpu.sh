#!/usr/bin/env bash
# Runs the CUDA build of kefu from a bundle made by `make gpu-bundle`, against
# the CUDA libraries already installed on the GPU machine.
#
#   ./run-gpu.sh                 kefu serve with the bundle's models and prompts
#   ./run-gpu.sh serve --addr 0.0.0.0:50051 --keys-file keys.txt
#   ./run-gpu.sh bench classify --device cuda --batches 1,64 --torch-python ""
#   ./run-gpu.sh --check         say which libraries were found, and stop
#
# What the binary links dynamically (everything else is static):
#   libcuda.so.1                                the NVIDIA driver (580 or newer: CUDA 13.0)
#   libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10
#                                               the CUDA 13 runtime libraries
# The kernels are sm_80 (A100) and sm_90a (H100/H200) code plus compute_80
# PTX; the driver must be at least as new as CUDA 13.0 to load that PTX.
#
# Libraries are looked for in $KEFU_CUDA_LIBS (colon-separated), $CUDA_HOME,
# /usr/local/cuda, the NVIDIA wheels of the machine's python3 (nvidia-cublas,
# nvidia-cuda-runtime, ...) and the driver's folders.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="$here/kefu"

# Unpack the binary once (xz, or Python's lzma where xz is missing).
if [ ! -x "$bin" ] || [ "$here/kefu.xz" -nt "$bin" ]; then
    tmp="$bin.unpacking.$$"
    if command -v xz >/dev/null 2>&1; then
        xz -dc "$here/kefu.xz" >"$tmp"
    else
        python3 -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
            "$here/kefu.xz" "$tmp"
    fi
    chmod +x "$tmp"
    mv "$tmp" "$bin"
fi

needed=(libcuda.so.1 libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10)
candidates=()
IFS=: read -r -a from_env <<<"${KEFU_CUDA_LIBS:-}"
candidates+=("${from_env[@]}")
for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /usr/local/cuda-13.0; do
    [ -n "$root" ] && candidates+=("$root/lib64" "$root/lib" "$root/targets/x86_64-linux/lib")
done
# NVIDIA's wheels: nvidia/cu13/lib (CUDA 13 wheels) or nvidia/<name>/lib.
if command -v python3 >/dev/null 2>&1; then
    while IFS= read -r dir; do
        candidates+=("$dir")
    done < <(python3 - <<'EOF' 2>/dev/null || true
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
for root in sorted(r for r in roots if r and os.path.isdir(os.path.join(r, "nvidia"))):
    for lib in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib"))):
        print(lib)
EOF
    )
fi
candidates+=(/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64 /lib/x86_64-linux-gnu)

path=()
missing=()
for lib in "${needed[@]}"; do
    found=""
    for dir in "${candidates[@]}"; do
        if [ -n "$dir" ] && [ -e "$dir/$lib" ]; then
            found="$dir"
            break
        fi
    done
    if [ -z "$found" ]; then
        missing+=("$lib")
        continue
    fi
    case ":$(IFS=:; echo "${path[*]:-}"):" in
        *":$found:"*) ;;
        *) path+=("$found") ;;
    esac
    [ "${1:-}" = "--check" ] && echo "run-gpu.sh: $lib from $found"
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "run-gpu.sh: not found: ${missing[*]}" >&2
    echo "run-gpu.sh: install the NVIDIA driver (libcuda.so.1) and CUDA 13 runtime libraries," >&2
    echo "            or point KEFU_CUDA_LIBS at the folders that hold them." >&2
    exit 1
fi
export LD_LIBRARY_PATH="$(IFS=:; echo "${path[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [ "${1:-}" = "--check" ]; then
    "$bin" --version
    exit 0
fi

# The bundle's models and prompts are kefu's relative defaults.
cd "$here"
if [ "$#" -eq 0 ]; then
    set -- serve
fi
exec "$bin" "$@"
