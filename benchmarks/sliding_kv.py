"""KV memory of sliding-window layers on the paged pool: blocks held per layer group, per step.

A hybrid model (Gemma3-style: five sliding layers of window W, then one full-attention layer,
random weights) generates a long sequence; after every step the pool's blocks in use are read
per group. A full-attention layer holds every position; a sliding layer, once its prompt is in,
only the blocks its window can still reach. Memory, not time: the figures do not depend on
the machine's load.

    .venv/bin/python benchmarks/sliding_kv.py --json benchmarks/sliding-kv-2026-11-25.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import transformers as tf

import pdcompile


class _Watch(tf.StoppingCriteria):
    def __init__(self, kv):
        self.kv, self.steps = kv, []

    def __call__(self, input_ids, scores, **kwargs):
        self.steps.append({w: s["in_use"] for w, s in self.kv.stats()["windows"].items()})
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--json")
    args = ap.parse_args()

    torch.manual_seed(0)
    config = tf.Gemma3TextConfig(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_hidden_layers=12, sliding_window_pattern=6, sliding_window=args.window, vocab_size=1024,
        max_position_embeddings=4096)
    model = tf.Gemma3ForCausalLM(config).eval()
    total = args.prompt + args.new_tokens
    fast = pdcompile.optimize(model, backend=args.backend, max_seq_len=total, max_batch_size=1,
                              block_size=args.block_size, prefix_cache=False)
    kv = fast.runner.kv
    watch = _Watch(kv)
    ids = torch.randint(3, config.vocab_size, (1, args.prompt))
    fast.generate(input_ids=ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  stopping_criteria=[watch])
    per_block = {g.window: g.pool.bytes_per_block for g in kv.groups}
    layers = {w: sum(1 for g in kv.geometry.layers if g.window == w) for w in per_block}
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "transformers": tf.__version__, "backend": args.backend,
        "config": {"layers": config.num_hidden_layers, "sliding_layers": layers.get(args.window, 0),
                   "full_layers": layers.get(0, 0), "window": args.window, "block_size": args.block_size,
                   "kv_heads": 2, "head_dim": 64, "dtype": "float32"},
        "prompt": args.prompt, "new_tokens": args.new_tokens,
        "groups": {},
    }
    for w, bpb in per_block.items():
        held = [s[w] for s in watch.steps]
        result["groups"][str(w)] = {
            "layers": layers[w],
            "blocks_after_prefill": held[0], "blocks_peak_after_prefill": max(held), "blocks_at_end": held[-1],
            "bytes_per_layer_at_end": held[-1] * bpb // layers[w],
            "bytes_per_layer_if_every_position_kept": -(-total // args.block_size) * bpb // layers[w],
        }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
