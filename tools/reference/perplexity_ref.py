#!/usr/bin/env python3
"""Reference perplexity with llama-perplexity's method from the numpy reference logits: chunks of CTX
tokens from token 0, each evaluated alone, tokens CTX/2+1 .. CTX-1 of each chunk scored.

    perplexity_ref.py MODEL.gguf --tokens 1,2,3,... --ctx 32 [--chunks N]     # prints JSON
"""
import argparse
import json

import numpy as np

from llama_ref import text_logits


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--ctx", type=int, required=True)
    ap.add_argument("--chunks", type=int)
    args = ap.parse_args()
    tokens = np.array([int(t) for t in args.tokens.split(",")])
    n_chunks = len(tokens) // args.ctx
    if args.chunks:
        n_chunks = min(n_chunks, args.chunks)
    nll = []
    for c in range(n_chunks):
        chunk = tokens[c * args.ctx : (c + 1) * args.ctx]
        logits = text_logits(args.model, chunk)
        for j in range(args.ctx // 2, args.ctx - 1):
            row = logits[j]
            lse = row.max() + np.log(np.exp(row - row.max()).sum())
            nll.append(lse - row[chunk[j + 1]])
    nll = np.array(nll)
    print(json.dumps({"ppl": float(np.exp(nll.mean())), "nll": float(nll.mean()), "scored": len(nll)}))


if __name__ == "__main__":
    main()
