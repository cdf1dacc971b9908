#!/usr/bin/env python3
"""`surgery-convert eval`'s measurement done by transformers, for scripts/bench's eval rows:

    bench_eval_transformers.py MODEL TEXT --tokens 4096 --ctx 512 --threads 2

The same convention as `eval` and tests/interop/common.py's perplexity(): the whole file tokenized
without special tokens, the first --tokens ids cut into non-overlapping --ctx windows (the
remainder dropped), each scored from position 0 without BOS, float32, sdpa attention. Prints one
JSON line: `seconds` from after the imports to the result (tokenizer and model loading,
tokenizing, the forward passes and scoring: what `eval`'s own `seconds` covers), `forward_seconds`
(the forward passes and scoring alone), and the perplexity.
"""

import argparse
import json
import math
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with open(args.text, encoding="utf-8") as f:
        ids = tok(f.read(), add_special_tokens=False)["input_ids"][: args.tokens]
    windows = len(ids) // args.ctx
    x = torch.tensor(ids[: windows * args.ctx], dtype=torch.long).view(windows, args.ctx)
    forward = time.perf_counter()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in x:
            w = w.unsqueeze(0)
            logits = model(input_ids=w, use_cache=False).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum"))
            count += args.ctx - 1
    done = time.perf_counter()
    print(json.dumps({
        "seconds": done - started,
        "forward_seconds": done - forward,
        "perplexity": math.exp(nll / count),
        "tokens": count,
        "threads": args.threads,
        "attention": model.config._attn_implementation,
    }))


if __name__ == "__main__":
    main()
