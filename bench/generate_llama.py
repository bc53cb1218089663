#!/usr/bin/env python3
"""llama.cpp's side of `kefu bench generate` (llama-cpp-python, built from
source by pip). Same GGUF, same chat, same thread count, greedy; prints one
JSON object with prompt tokens/s, decode tokens/s and time to first token,
the mean of the runs after a warm-up."""
import argparse
import json
import os
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--system", required=True)
    ap.add_argument("--user", required=True)
    args = ap.parse_args()

    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=2048, verbose=False, seed=0)
    messages = [{"role": "system", "content": args.system}, {"role": "user", "content": args.user}]
    results = []
    for run in range(args.runs):
        llm.reset()  # no KV reuse between runs: prefill is measured every time
        start = time.perf_counter()
        first = None
        n = 0
        for chunk in llm.create_chat_completion(messages, max_tokens=args.max_new_tokens, temperature=0.0,
                                                top_k=1, stream=True):
            delta = chunk["choices"][0]["delta"].get("content")
            if delta:
                if first is None:
                    first = time.perf_counter() - start
                n += 1
        end = time.perf_counter()
        t = llm._ctx.get_timings() if hasattr(llm, "_ctx") and hasattr(llm._ctx, "get_timings") else None
        if run == 0:
            continue
        if t is not None:
            prompt_tps = t.n_p_eval / (t.t_p_eval_ms / 1000) if t.t_p_eval_ms else 0.0
            decode_tps = t.n_eval / (t.t_eval_ms / 1000) if t.t_eval_ms else 0.0
            n_prompt = t.n_p_eval
        else:
            n_prompt = len(llm.tokenize(args.system.encode() + args.user.encode()))
            prompt_tps = n_prompt / first if first else 0.0
            decode_tps = (n - 1) / (end - start - first) if first and n > 1 else 0.0
        results.append((n_prompt, prompt_tps, decode_tps, first or 0.0))
    k = len(results)
    print(json.dumps({
        "model": os.path.basename(args.model),
        "prompt_tokens": results[0][0],
        "prompt_tokens_per_second": sum(r[1] for r in results) / k,
        "decode_tokens_per_second": sum(r[2] for r in results) / k,
        "time_to_first_token_seconds": sum(r[3] for r in results) / k,
    }))


if __name__ == "__main__":
    main()
