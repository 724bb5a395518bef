"""Tiny random-weight models of the parity families, built in the test (no downloads).

initializer_range=0.1: with HF's default 0.02 greedy decoding of a random model
repeats one token, which would make token-equality tests meaningless.
"""

from __future__ import annotations

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


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[family]()
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
