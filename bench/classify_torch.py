#!/usr/bin/env python3
"""PyTorch transformers' side of `kefu bench classify`.

Runs the same checkpoint on the same texts with the same thread count and
prints one JSON object: messages/s for each case and the process's peak RSS.
`kefu bench classify --torch-python PYTHON` runs this and prints both side by
side; it can also be run alone:

    python3 bench/classify_torch.py --model models/sentiment --cases cases.json --threads 2
"""
import argparse
import json
import resource
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--cases", required=True, help="JSON: [{name, batch, texts}]")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--max-len", type=int, default=128)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(args.threads)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    # kefu truncates to the model's position table as well.
    max_len = min(args.max_len, model.config.max_position_embeddings)
    with open(args.cases, encoding="utf-8") as f:
        cases = json.load(f)
    results = []
    with torch.inference_mode():
        for case in cases:
            texts, batch = case["texts"], case["batch"]
            batches = [texts[i:i + batch] for i in range(0, len(texts), batch)]

            def run(b):
                enc = tok(b, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
                return model(**enc).logits.softmax(-1)

            run(batches[0])  # warm-up
            done, i, start = 0, 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                b = batches[i % len(batches)]
                run(b)
                done += len(b)
                i += 1
            elapsed = time.perf_counter() - start
            results.append({"name": case["name"], "batch": batch, "messages_per_second": done / elapsed})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"framework": f"pytorch {torch.__version__}", "results": results, "peak_rss_mb": peak_mb}))


if __name__ == "__main__":
    main()
