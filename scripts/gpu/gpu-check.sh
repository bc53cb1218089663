#!/usr/bin/env bash
# kefu's GPU check, run from a bundle made by `make gpu-bundle` on a machine
# with an NVIDIA GPU. It writes four files under $OUT (default ./gpu-results):
#   report.txt     the GPU (nvidia-smi), the CUDA libraries found, each step's
#                  output, kefu serve's health, one chat turn, and the device
#                  each model landed on
#   classify.json  classifier messages/s on the GPU at batch 1 and 64
#   generate.json  decode tokens/s at batch 1 and aggregate tokens/s with 32
#                  replies at once
#   serve.log      kefu serve's whole log
#
# The generator measured is, in this order: $KEFU_GPU_GENERATOR; the bundle's
# Qwen GGUF; or, when the bundle travels without it (it is 491 MB), a model
# of Qwen2.5-0.5B's exact shape with random weights, built here with the
# machine's transformers from the tokenizer in models/qwen-shape/ (speed
# depends on the shape, not on the weights; the replies are gibberish).
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$here/gpu-results}"
mkdir -p "$out"
cd "$here"
report="$out/report.txt"
: >"$report"
exec > >(tee -a "$report") 2>&1
step() { echo "== $(date +%T) $*"; }

step "GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv

step "libraries"
./run-gpu.sh --check || exit 1

step "generator model"
gen="${KEFU_GPU_GENERATOR:-}"
if [ -z "$gen" ]; then
    gen="$(ls models/qwen2.5-coder-0.5b-instruct/*.gguf 2>/dev/null | head -1 || true)"
fi
if [ -z "$gen" ] && [ -f models/qwen-shape/config.json ]; then
    gen=/tmp/kefu-qwen-shape
    python3 - models/qwen-shape "$gen" <<'EOF' || gen=""
import lzma, os, shutil, sys, torch, transformers
src, dst = sys.argv[1], sys.argv[2]
packed = os.path.join(src, "tokenizer.json.xz")
if os.path.exists(packed) and not os.path.exists(os.path.join(src, "tokenizer.json")):
    with lzma.open(packed) as f, open(os.path.join(src, "tokenizer.json"), "wb") as g:
        shutil.copyfileobj(f, g)
config = transformers.AutoConfig.from_pretrained(src)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(dst, safe_serialization=True)
# kefu's own config (the transformers 4 layout mistral.rs reads) and tokenizer.
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(f"{src}/{name}", dst)
print(f"random-weight {config.model_type}, {sum(p.numel() for p in model.parameters())/1e6:.0f}M parameters, in {dst}")
EOF
fi
echo "generator: ${gen:-none}"

step "classifier on the GPU"
./run-gpu.sh bench classify --device cuda --batches 1,64 --torch-python "" --seconds 3 --json \
    >"$out/classify.json"
cat "$out/classify.json"

if [ -n "$gen" ]; then
    step "generator on the GPU: batch 1, then 32 at once"
    ./run-gpu.sh bench generate --device cuda --model "$gen" --llama-python "" \
        --threads "$(nproc)" --runs 3 --max-new-tokens 128 --concurrent 32 --json \
        >"$out/generate.json" 2> >(grep -v "INFO" >&2)
    cat "$out/generate.json"
fi

step "kefu serve on the GPU"
rm -rf /tmp/kefu-gpu-data
serve_args=(serve --addr 127.0.0.1:50061 --data-dir /tmp/kefu-gpu-data --device cuda --gpu-fallback refuse)
if [ -n "$gen" ]; then
    serve_args+=(--generator-model "$gen")
else
    serve_args+=(--no-generator)
fi
./run-gpu.sh "${serve_args[@]}" >"$out/serve.log" 2>&1 &
server=$!
if ./run-gpu.sh health --addr http://127.0.0.1:50061 --wait 300; then
    echo "我的快递三天没动了，订单号 2024112900123，什么时候能到？" |
        timeout 120 ./run-gpu.sh chat --addr http://127.0.0.1:50061 --user gpu-check
fi
kill "$server" 2>/dev/null
wait "$server" 2>/dev/null
grep -E "classifier loaded|generator loaded|model devices|not on the GPU" "$out/serve.log"
step "done: results in $out"
