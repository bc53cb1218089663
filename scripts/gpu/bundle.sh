#!/usr/bin/env bash
# `make gpu-bundle`: one folder to copy to a GPU machine.
#
#   kefu.xz        the CUDA build of kefu (make build-cuda), xz-compressed
#   run-gpu.sh     unpacks it once and runs it against the machine's CUDA 13
#                  libraries (see the script for what is linked dynamically)
#   gpu-check.sh   the GPU measurements (health, a chat turn, classifier and
#                  generator speed), results under $OUT
#   prompts/, models/sentiment, models/intent   kefu's defaults
#   models/...     the generator, per GPU_BUNDLE_GENERATOR:
#                    qwen   the Qwen2.5-Coder-0.5B GGUF (491 MB; make models)
#                    shape  its config and tokenizer only (~3 MB), for speed
#                           measurements where the bundle must travel light
#                    none   no generator
#
# Everything but models/ must stay within 60 MB; the script fails otherwise.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
dest="${GPU_BUNDLE_DIR:-dist/kefu-gpu}"
bin="${KEFU_CUDA_TARGET_DIR:-/var/tmp/kefu-target-cuda}/debug/kefu"
generator="${GPU_BUNDLE_GENERATOR:-qwen}"
python="${PYTHON:-python3}"
qwen=models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct.gguf
limit_mb=60

[ -x "$bin" ] || { echo "gpu-bundle: $bin is missing: run make build-cuda" >&2; exit 1; }
case "$generator" in qwen | shape | none) ;; *)
    echo "gpu-bundle: GPU_BUNDLE_GENERATOR must be qwen, shape or none" >&2
    exit 1
    ;;
esac

tmp="$dest.tmp"
rm -rf "$tmp"
mkdir -p "$tmp/models"
echo "gpu-bundle: compressing $(du -h "$bin" | cut -f1) binary"
xz -9 -T"$(nproc)" -c "$bin" >"$tmp/kefu.xz"
cp scripts/gpu/run-gpu.sh scripts/gpu/gpu-check.sh "$tmp/"
cp -r prompts "$tmp/"
cp -r models/sentiment models/intent "$tmp/models/"

case "$generator" in
qwen)
    [ -f "$qwen" ] || { echo "gpu-bundle: $qwen is missing: run make models" >&2; exit 1; }
    mkdir -p "$tmp/$(dirname "$qwen")"
    cp -l "$qwen" "$tmp/$qwen" 2>/dev/null || cp "$qwen" "$tmp/$qwen"
    ;;
shape)
    [ -f "$qwen" ] || { echo "gpu-bundle: $qwen is missing: run make models" >&2; exit 1; }
    # transformers reads a GGUF's config and tokenizer only with torch
    # installed (its GGUF loader imports it), so a Python without torch
    # cannot make the shape folder; installing torch here would be ~1 GB.
    if ! "$python" -c "import transformers, gguf, torch" 2>/dev/null; then
        echo "gpu-bundle: GPU_BUNDLE_GENERATOR=shape needs a Python with torch, transformers" >&2
        echo "and gguf: run it as PYTHON=/path/to/python make gpu-bundle" >&2
        exit 1
    fi
    "$python" scripts/gpu/qwen_shape.py "$qwen" "$tmp/models/qwen-shape"
    xz -9 "$tmp/models/qwen-shape/tokenizer.json" # gpu-check.sh unpacks it
    ;;
esac

cat >"$tmp/README.txt" <<EOF
kefu $(git describe --always --dirty 2>/dev/null || echo "?"), CUDA build (sm_80 + sm_90a, PTX compute_80), made $(date -u +%F).
Start:   ./run-gpu.sh                      (kefu serve on 127.0.0.1:50051)
Check:   ./run-gpu.sh --check              (which CUDA libraries were found)
Measure: OUT=/tmp/results ./gpu-check.sh
Needs:   NVIDIA driver 580+ (CUDA 13.0) and the CUDA 13 runtime libraries
         (libcudart, libcublas, libcublasLt, libcurand), for
         example NVIDIA's pip wheels or /usr/local/cuda.
EOF

size_kb=$(du -sk --exclude=models "$tmp" | cut -f1)
shape_kb=0
[ -d "$tmp/models/qwen-shape" ] && shape_kb=$(du -sk "$tmp/models/qwen-shape" | cut -f1)
if [ $((size_kb / 1024)) -ge "$limit_mb" ]; then
    echo "gpu-bundle: $((size_kb / 1024)) MB without the models, over the ${limit_mb} MB limit" >&2
    exit 1
fi
rm -rf "$dest"
mv "$tmp" "$dest"
echo "gpu-bundle: $dest: $((size_kb / 1024)) MB without the models" \
    "(+ $(du -sh "$dest/models" | cut -f1) of models, of which qwen-shape $((shape_kb / 1024)) MB)"
