#!/usr/bin/env python3
"""Independent numpy reference of CSM frame generation (greedy), over our CSM GGUF.

    csm_ref.py MODEL.gguf --rows rows.json --frames N     # prints JSON: frames and per-frame logits

rows.json is a list of backbone rows, each {"text": id} or {"audio": [codes...]}. Written from the
model's description (DESIGN.md §4), reusing only the plain Llama stack of llama_ref.py.
"""
import argparse
import json

import numpy as np

from llama_ref import Gguf, Stack, StackConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rows", required=True)
    ap.add_argument("--frames", type=int, required=True)
    args = ap.parse_args()

    g = Gguf(args.model)
    neox = g.value("csm.rope_layout") == "neox"
    backbone = Stack(g, StackConfig(g, "csm.backbone", neox), prefix="backbone.")
    decoder = Stack(g, StackConfig(g, "csm.decoder", neox), prefix="decoder.")
    V, K = int(g.value("csm.audio_vocab_size")), int(g.value("csm.audio_num_codebooks"))
    text_embd = g.tensor("token_embd.weight")  # [text_vocab, D_backbone]
    audio_embd = g.tensor("audio_embd.weight")  # [V * K, D_backbone]: code c of codebook k is row c + k V
    projection = g.tensor("projection.weight")  # [D_decoder, D_backbone]
    c0_head = g.tensor("codebook0_head.weight")  # [V, D_backbone]
    audio_head = g.tensor("audio_head.weight")  # [K - 1, V, D_decoder]

    def embed(row):
        if "text" in row:
            return text_embd[row["text"]]
        return sum(audio_embd[c + k * V] for k, c in enumerate(row["audio"]))

    with open(args.rows) as f:
        rows = json.load(f)
    pos = 0

    def backbone_step(rows):
        nonlocal pos
        x = np.stack([embed(r) for r in rows])
        h = backbone.forward(x, np.arange(pos, pos + len(rows)))[-1]
        pos += len(rows)
        return h

    h = backbone_step(rows)
    frames, logits = [], []
    for _ in range(args.frames):
        frame_logits = [h @ c0_head.T]
        codes = [int(np.argmax(frame_logits[0]))]
        decoder.reset()
        x = np.stack([h, audio_embd[codes[0]]]) @ projection.T
        hd = decoder.forward(x, np.array([0, 1]))[-1]
        for s in range(K - 1):
            if s > 0:
                x = (audio_embd[codes[s] + s * V] @ projection.T)[None, :]
                hd = decoder.forward(x, np.array([s + 1]))[-1]
            frame_logits.append(audio_head[s] @ hd)
            codes.append(int(np.argmax(frame_logits[-1])))
        if all(c == 0 for c in codes):
            break
        frames.append(codes)
        logits.append([l.tolist() for l in frame_logits])
        h = backbone_step([{"audio": codes}])
    print(json.dumps({"frames": frames, "logits": logits}))


if __name__ == "__main__":
    main()
