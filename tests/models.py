"""Tiny random-weight models of the parity families, built in the test (no downloads).

initializer_range=0.1: with HF's default 0.02 greedy decoding of a random model
repeats one token, which would make token-equality tests meaningless.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import transformers as tf

VOCAB = 256

FAMILIES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.1, max_position_embeddings=512)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.1, max_position_embeddings=512,
        sliding_window=256)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.1, max_position_embeddings=512)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, initializer_range=0.1,
        max_position_embeddings=512)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=512, initializer_range=0.5,
        bos_token_id=1, eos_token_id=2)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, initializer_range=0.1, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=None)),
}

# Sliding-window families are verified inside their window only: the window is set at
# least as long as any sequence the tests run (max_seq_len 256 in conftest), so every
# layer attends to the whole sequence. Sliding beyond the window is tracked separately.
WINDOW = 512

# Same size for every family: 2 layers, hidden 64, 4 heads (2 KV heads where the family
# has GQA), vocab 256; special tokens inside the vocabulary. initializer_range is raised
# per family where 0.1 still gives a near-constant greedy output (>= 8 distinct tokens in
# 64 for every row of the test batches is the bar).
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=VOCAB, initializer_range=0.1, max_position_embeddings=512,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GQA = dict(_TINY, num_key_value_heads=2)


def _gqa(**overrides):
    return dict(_GQA, **overrides)


# More decoder-only families, by how widely they are used. Apart from FAMILIES so that the
# per-family pass and paged-cache tests keep their cost; test_parity covers all of them.
NEW_FAMILIES = {
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_gqa(head_dim=16, initializer_range=0.3))),
    # Gemma 2/3 untied: with embeddings scaled by sqrt(hidden), post-norms and a tied head,
    # a random model predicts its input token again (one repeated token).
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_gqa(
        head_dim=16, sliding_window=WINDOW, tie_word_embeddings=False, initializer_range=0.3))),  # logit soft-capping
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**_gqa(
        head_dim=16, sliding_window=WINDOW, tie_word_embeddings=False, initializer_range=0.2))),
    "olmo": lambda: tf.OlmoForCausalLM(tf.OlmoConfig(**_GQA)),
    "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**_GQA)),
    "granite": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(
        **_GQA, embedding_multiplier=2.0, logits_scaling=2.0, residual_multiplier=0.5, attention_multiplier=0.25)),
    "stablelm": lambda: tf.StableLmForCausalLM(tf.StableLmConfig(**_GQA)),  # partial rotary (25%)
    "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**_TINY)),  # partial rotary (50%), parallel block
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_TINY)),
    "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(
        **{k: v for k, v in _TINY.items() if k not in ("intermediate_size", "initializer_range")},
        ffn_hidden_size=128, initializer_range=0.2)),  # multi-query
    "cohere": lambda: tf.CohereForCausalLM(tf.CohereConfig(**_gqa(initializer_range=0.2))),
    "starcoder2": lambda: tf.Starcoder2ForCausalLM(tf.Starcoder2Config(**_gqa(sliding_window=WINDOW, initializer_range=0.3))),
    "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        **_GQA, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)),
    "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**_GQA, num_local_experts=4, num_experts_per_tok=2)),
    "smollm3": lambda: tf.SmolLM3ForCausalLM(tf.SmolLM3Config(
        **_gqa(initializer_range=0.2), no_rope_layer_interval=2)),  # layer 1 without rotary (NoPE)
    "gpt_bigcode": lambda: tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=512, initializer_range=0.2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),  # multi-query
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
        vocab_size=VOCAB, init_std=0.2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)),
}

ALL_FAMILIES = {**FAMILIES, **NEW_FAMILIES}

# transformers' default mixture-of-experts kernel on CPU is the custom op
# transformers::grouped_mm_fallback, which torch.onnx cannot translate; "batched_mm"
# (a gather of each token's expert weights + batched matmul) lowers to plain ONNX ops.
MOE_FAMILIES = ("qwen3_moe", "mixtral")
ONNX_EXPERTS_IMPLEMENTATION = "batched_mm"


def build(family: str, seed: int = 0, backend: str | None = None):
    torch.manual_seed(seed)
    model = ALL_FAMILIES[family]()
    if backend == "onnxruntime" and family in MOE_FAMILIES:
        model.set_experts_implementation(ONNX_EXPERTS_IMPLEMENTATION)
    return model.eval()


def left_padded_batch(seed: int = 1, lengths=(11, 6, 3), vocab: int = VOCAB):
    """Three prompts of very different lengths, left-padded (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def word_tokenizer(vocab: int = VOCAB):
    """A word-level tokenizer over tokens "w0".."w{vocab-1}", built locally (no downloads)."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(tmodels.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w2", bos_token="w1")


# User processors and stopping criteria, as an HF user would write them (test_inputs, the fuzzer).
class StopAtLength(tf.StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    def __repr__(self):
        return f"StopAtLength({self.length})"


class Ban(tf.LogitsProcessor):
    def __init__(self, token):
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] = -float("inf")
        return scores

    def __repr__(self):
        return f"Ban({self.token})"


def generate_in_fresh_process(path, generate_kwargs: dict, load_kwargs: str = "", checks: str = "") -> torch.Tensor:
    """``pdcompile.load(path)`` in a new Python process (nothing shared with this one), then
    ``generate()`` on :func:`left_padded_batch`: the sequences it returned. ``checks``: Python
    lines run on the loaded model ``m`` first."""
    script = (
        "import json, sys, torch, pdcompile\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import models\n"
        "ids, mask = models.left_padded_batch()\n"
        f"m = pdcompile.load({str(path)!r}{', ' + load_kwargs if load_kwargs else ''})\n"
        f"{checks}"
        f"out = m.generate(input_ids=ids, attention_mask=mask, **{generate_kwargs!r})\n"
        "print(json.dumps(out.tolist()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
