"""The shape of kefu's default generator without its 491 MB of weights.

`make gpu-bundle` runs this to write config.json, tokenizer.json and the
chat template of the Qwen2.5-Coder-0.5B GGUF into a folder of a few MB, so a
bundle that must travel light (the device tool carries 64 MiB) can still
measure generation speed on a GPU: gpu-check.sh fills that shape with random
weights there (speed depends on the shape and dtype, not on the values).

Usage: python3 qwen_shape.py MODEL.gguf OUT_DIR   (needs transformers and gguf)
"""

import json
import os
import sys


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    gguf_path, out = sys.argv[1], sys.argv[2]
    try:
        import transformers
    except ImportError:
        print("qwen_shape: needs transformers and gguf (pip install transformers gguf)", file=sys.stderr)
        return 1
    folder, name = os.path.split(os.path.abspath(gguf_path))
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    os.makedirs(out, exist_ok=True)
    tokenizer.save_pretrained(out)
    config.save_pretrained(out)
    # mistral.rs reads the transformers 4 layout: rope_theta at the top level
    # and the architecture by name.
    path = os.path.join(out, "config.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rope = data.get("rope_parameters") or {}
    data.setdefault("rope_theta", rope.get("rope_theta", 1000000.0))
    data["architectures"] = ["Qwen2ForCausalLM"]
    data["torch_dtype"] = "bfloat16"
    data.pop("_model_name_or_path", None)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    print(f"qwen_shape: {out} ({data['num_hidden_layers']} layers, hidden {data['hidden_size']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
