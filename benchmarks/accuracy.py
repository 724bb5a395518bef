"""Accuracy of quantized weights: perplexity and greedy agreement against fp32.

    python benchmarks/accuracy.py --model smollm2              # fp32, int8, int4 (about 10-20 min on 2 cores)
    python benchmarks/accuracy.py --model r1 --prompts 4 --new 16 --max-tokens 2048 --window 256  # a quick check

Text: benchmarks/data/alice-ch1-2.txt (Lewis Carroll, public domain; ~5.5k SmolLM2 tokens).
SmolLM2 reads it through its tokenizer. R1 (random weights, no tokenizer) reads its UTF-8
bytes as token ids 3..258: its perplexity means nothing on its own, only the ratio of each
variant to fp32 does.

Per variant (``--variants``, default fp32,int8,int4; also int8-asym, int4-asym, int4-g64,
int4-nohead, int4-head4, int4-narrow4, int4-plain, int4-g16,
int8-nohead, int8-a0, int4-a0, bf16-prefill (prefill_dtype="bfloat16": the perplexity is the
score graph's, in bf16; greedy decode is fp32 after a bf16 prefill); ``--bf16`` adds HF eager in
bfloat16):
  * perplexity over the text in non-overlapping windows of ``--window`` tokens (each
    window starts fresh, so the first tokens of each are predicted without context);
  * greedy agreement with fp32 HF eager: ``--prompts`` prompts of 32 tokens cut from the
    text at even spacing, ``--new`` new tokens each, batched; reported as the mean share of
    new tokens before the first divergence, and the number of rows identical to the end.
``--peers ENGINE[:VARIANT] ...`` measures the CPU engines' own files the same way
(pdcompile.cpu_peers: llama.cpp f32/q8_0/q4_0, ONNX Runtime GenAI fp32/int4, OpenVINO GenAI
fp32/int8/int4, converted from the same HF folder; `make bench-peers` installs them): the
perplexity from each engine's logits over the same windows, the greedy tokens from its own
generation loop at batch 1, EOS ignored. Their fp32 rows check the method: they should land
on HF eager's perplexity.
Quantized variants run pdcompile with ``--backend`` (default eager: the reference graphs,
no compile time; onnxruntime and inductor match them within the tolerances in
tests/test_quant.py). Targets (issue 15): int8 perplexity within 1% of fp32, int4 within 6%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

# run from a checkout: this tree's pdcompile, not whichever one is installed
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXT = Path(__file__).parent / "data" / "alice-ch1-2.txt"

VARIANTS = {
    "fp32": None,
    "int8": dict(bits=8),
    "int4": dict(bits=4),
    "int8-asym": dict(bits=8, symmetric=False),
    "int4-asym": dict(bits=4, symmetric=False),
    "int4-g64": dict(bits=4, group_size=64),
    "int4-nohead": dict(bits=4, lm_head=False),
    "int4-head4": dict(bits=4, lm_head_bits=4),  # the lm_head at 4 bits too (the default keeps it at 8)
    # the layers with fewer outputs than inputs (down, GQA's k/v) at 4 bits too (the default keeps them at 8)
    "int4-narrow4": dict(bits=4, narrowing_bits=4),
    "int4-plain": dict(bits=4, lm_head_bits=4, narrowing_bits=4),  # every linear at 4 bits
    "int4-g16": dict(bits=4, group_size=16),
    "int8-nohead": dict(bits=8, lm_head=False),
    # fp32 activations (accuracy_level 0) in both phases; the presets above round each
    # linear's input to int8 per group (level 4, the default) on every backend
    "int8-a0": dict(bits=8, prefill_accuracy_level=0, decode_accuracy_level=0),
    "int4-a0": dict(bits=4, prefill_accuracy_level=0, decode_accuracy_level=0),
    # fp32 weights, prefill's (and the score graph's) linear layers in bf16; decode fp32
    "bf16-prefill": dict(prefill_dtype="bfloat16"),
}


def text_ids(name: str, tokenizer) -> torch.Tensor:
    text = TEXT.read_text(encoding="utf-8").split("----\n", 1)[1]
    if tokenizer is None:  # R1: bytes as tokens, clear of ids 0-2 (pad/bos/eos)
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long) + 3
    return tokenizer(text, return_tensors="pt").input_ids[0]


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window].unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, new: int) -> torch.Tensor:
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[:, prompts.shape[1]:]


def peer_perplexity(peer, ids: torch.Tensor, window: int) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        logits = torch.from_numpy(peer.prompt_logits(chunk.tolist()))[:-1]
        nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def peer_greedy(peer, prompts: torch.Tensor, new: int) -> torch.Tensor:
    rows = [peer.generate(row[None], torch.ones_like(row[None]), new)[0][0, prompts.shape[1]:] for row in prompts]
    return torch.stack(rows)


def agreement(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, int]:
    prefix = []
    for a, b in zip(ref, out):
        diff = (a != b).nonzero()
        prefix.append(int(diff[0, 0]) if len(diff) else len(a))
    return sum(prefix) / ref.numel(), sum(p == ref.shape[1] for p in prefix)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 or r1")
    p.add_argument("--backend", default="eager")
    p.add_argument("--variants", default="fp32,int8,int4")
    p.add_argument("--bf16", action="store_true", help="also HF eager in bfloat16")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--max-tokens", type=int, help="use only the text's first N tokens (a quick check)")
    p.add_argument("--peers", nargs="*", default=[], metavar="ENGINE[:VARIANT]",
                   help="also the CPU engines' converted files: llama-cpp, ort-genai, openvino-genai")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import pdcompile
    from pdcompile import models

    if args.model == "r1":
        model, tokenizer = models.r1_model(), None
    else:
        model, tokenizer = models.load_smollm2()
    ids = text_ids(args.model, tokenizer)[: args.max_tokens]
    step = (len(ids) - args.prompt_len) // args.prompts
    prompts = torch.stack([ids[i * step:i * step + args.prompt_len] for i in range(args.prompts)])
    print(f"{args.model}: text {len(ids)} tokens, {args.prompts} prompts of {args.prompt_len}, {args.new} new tokens")

    t = time.perf_counter()
    ref_ppl = perplexity(model, ids, args.window)
    ref_tokens = greedy(model, prompts, args.new)
    rows = [dict(variant="HF eager fp32", ppl=ref_ppl, ppl_ratio=1.0, agree=1.0, identical=args.prompts,
                 seconds=time.perf_counter() - t)]
    print(rows[-1])
    if args.bf16:
        t = time.perf_counter()
        bf = models.r1_model() if args.model == "r1" else models.load_smollm2()[0]
        bf = bf.to(torch.bfloat16)
        ppl = perplexity(bf, ids, args.window)
        agree, same = agreement(ref_tokens, greedy(bf, prompts, args.new))
        rows.append(dict(variant="HF eager bf16", ppl=ppl, ppl_ratio=ppl / ref_ppl, agree=agree, identical=same,
                         seconds=time.perf_counter() - t))
        print(rows[-1])
        del bf
    for name in [v for v in args.variants.split(",") if v]:
        t = time.perf_counter()
        spec = dict(VARIANTS[name] or {})
        prefill_dtype = spec.pop("prefill_dtype", "float32")
        quant = pdcompile.QuantConfig(**spec) if spec else None
        config = pdcompile.OptimizeConfig(
            backend=args.backend, quant=quant, prefill_dtype=prefill_dtype,
            cache=pdcompile.CacheConfig(max_batch_size=args.prompts,
                                        max_seq_len=max(args.window, args.prompt_len + args.new) + 1),
        )
        fast = pdcompile.optimize(model, config=config)
        ppl = perplexity(fast, ids, args.window)
        agree, same = agreement(ref_tokens, greedy(fast, prompts, args.new))
        rows.append(dict(variant=f"pdcompile {args.backend} {name}", quant=dataclasses.asdict(quant) if quant else None,
                         prefill_dtype=prefill_dtype,
                         ppl=ppl, ppl_ratio=ppl / ref_ppl, agree=agree, identical=same,
                         seconds=time.perf_counter() - t))
        print(rows[-1])
        del fast
    if args.peers:
        from pdcompile import cpu_peers

        for spec in args.peers:
            for peer in cpu_peers.build(spec, model, tokenizer, max_seq_len=max(args.window, args.prompt_len + args.new)):
                t = time.perf_counter()
                peer.ignore_eos = True
                peer.prepare()
                ppl = peer_perplexity(peer, ids, args.window)
                agree, same = agreement(ref_tokens, peer_greedy(peer, prompts, args.new))
                rows.append(dict(variant=peer.name, weight_bytes=peer.weight_bytes, ppl=ppl, ppl_ratio=ppl / ref_ppl,
                                 agree=agree, identical=same, seconds=time.perf_counter() - t))
                print(rows[-1])
                del peer
    print(f"\n{'variant':34s} {'perplexity':>11s} {'vs fp32':>8s} {'greedy agreement':>17s} {'rows identical':>15s}")
    for r in rows:
        print(f"{r['variant']:34s} {r['ppl']:11.3f} {100 * (r['ppl_ratio'] - 1):+7.2f}% {100 * r['agree']:16.1f}% "
              f"{r['identical']:>8d}/{args.prompts}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=args.model, backend=args.backend, rows=rows), indent=1))


if __name__ == "__main__":
    main()
