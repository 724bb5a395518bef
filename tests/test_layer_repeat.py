"""One decoder layer lowered, repeated (capture.repeated_layers, backends/ort_layers.py).

On the onnxruntime backend optimize() captures layers 0, 1, 2 and N-1 of an N-layer model and
makes layers 3..N-2 from the lowered layer 2. Held here, on 6- and 7-layer models whose
layers all have their own weights (norms included: a fresh model's are all ones, which
would hide a layer reading another's):
- greedy tokens identical to HF eager and logits within test_parity's tolerance, for the
  default phases (prefill, decode, extend: a prefix-cache hit too);
- the engine the same graph as lowering every layer (same op counts);
- models whose layers differ (per-layer constants, layer kinds) are lowered whole, correctly;
- the model is left as it was; the compile cache and bundles carry the repeated engines.
"""

import pytest
import torch
import transformers as tf

import models
import pdcompile
from pdcompile import capture
from pdcompile.backends.onnxruntime import OrtOptions
from pdcompile.config import CacheConfig, OptimizeConfig
from test_parity import ATOL, RTOL

pytest.importorskip("onnxruntime")

NEW_TOKENS = 16


def _deep(family: str, layers: int, **overrides):
    """A models.py family with ``layers`` decoder layers, every parameter its own random values."""
    torch.manual_seed(0)
    model = models.ALL_FAMILIES[family]()
    config = model.config
    key = "n_layer" if hasattr(config, "n_layer") else "num_hidden_layers"
    kwargs = {**config.to_dict(), key: layers, **overrides}
    kwargs.pop("layer_types", None)
    model = type(model)(type(config)(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _optimize(model, repeat: bool = True, **options):
    config = OptimizeConfig(backend="onnxruntime", cache=CacheConfig(max_seq_len=256, **options),
                            backend_options=OrtOptions(repeat_layers=repeat))
    return pdcompile.optimize(model, config=config, cache=False)


def _check_tokens_and_logits(model, fast):
    ids, mask = models.left_padded_batch(lengths=(11, 6, 3))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False)
    out = fast.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                        do_sample=False)
    assert torch.equal(out, ref)
    full = ids[mask.all(1)]  # forward() of unpadded rows (HF's forward takes positions from the mask only in generate)
    with torch.no_grad():
        want = model(full).logits[:, -1]
        got = fast(full).logits[:, -1]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family, layers", [("llama", 6), ("qwen3", 7), ("gpt2", 6), ("phi3", 6)])
def test_repeated_layers_match_hf(family, layers):
    model = _deep(family, layers)
    fast = _optimize(model)
    for phase, g in fast.graphs.items():
        assert g.ctx.layers is not None and g.ctx.layers.kept == (0, 1, 2, layers - 1), phase
        assert len(g.ctx.model_signature.of(pdcompile.phase.Role.POOL)) == 2 * layers
    _check_tokens_and_logits(model, fast)
    # the model itself is as it was
    assert len(capture.decoder_layers(model)[1]) == layers and model.config.num_hidden_layers == layers
    assert [getattr(m, "layer_idx", i) for i, m in enumerate(capture.decoder_layers(model)[1])] == list(range(layers)) \
        or family == "gpt2"  # GPT2Block has no layer_idx of its own


@pytest.mark.parametrize("block_size", [8, 32])
def test_repeated_layers_at_other_block_sizes(block_size):
    model = _deep("llama", 6)
    fast = _optimize(model, block_size=block_size, prefix_cache=False)
    assert fast.graphs["decode"].ctx.model_signature.block_size == block_size
    assert fast.graphs["decode"].ctx.layers is not None
    _check_tokens_and_logits(model, fast)


def test_prefix_cache_hit_through_the_repeated_extend_graph():
    model = _deep("llama", 6)
    fast = _optimize(model)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, models.VOCAB, (1, 40), generator=g)
    first = torch.cat([prefix, torch.randint(3, models.VOCAB, (1, 5), generator=g)], 1)
    second = torch.cat([prefix, torch.randint(3, models.VOCAB, (1, 7), generator=g)], 1)
    for ids in (first, second):  # the second call continues from the first one's cached blocks
        out = fast.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(out, model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                               do_sample=False))
    assert fast.last_timings.reused_tokens == (32,)  # two 16-token blocks of the 40-token prefix


def test_same_engine_as_lowering_every_layer():
    model = _deep("llama", 6)
    repeated, whole = _optimize(model, prefix_cache=False), _optimize(model, repeat=False, prefix_cache=False)
    assert all(g.ctx.layers is None for g in whole.graphs.values())
    for phase in ("prefill", "decode"):
        a, b = (f.runner.executor.phases[phase][0].op_types for f in (repeated, whole))
        assert a == b, phase


def test_layers_that_differ_are_lowered_whole():
    # GPT-2 scaling each layer's attention by 1 / (layer_idx + 1): a per-layer constant
    model = _deep("gpt2", 6, scale_attn_by_inverse_layer_idx=True)
    plan, why = capture.repeated_layers(model, capture.probe_geometry(model))
    assert plan is None and "differently" in why
    fast = _optimize(model, prefix_cache=False)
    assert all(g.ctx.layers is None for g in fast.graphs.values())
    _check_tokens_and_logits(model, fast)


def test_lowered_layers_that_differ_fall_back_to_every_layer(monkeypatch):
    # Without the eager check, the ONNX one (layer 2 must be layer 1 lowered again) sees the
    # per-layer constant, and optimize() captures and lowers every layer instead.
    model = _deep("gpt2", 6, scale_attn_by_inverse_layer_idx=True)
    monkeypatch.setattr(capture, "_middle_layers_repeat", lambda model, path, layers: True)
    assert capture.repeated_layers(model, capture.probe_geometry(model))[0] is not None
    fast = _optimize(model, prefix_cache=False)
    assert all(g.ctx.layers is None for g in fast.graphs.values())
    _check_tokens_and_logits(model, fast)


def test_alternating_layer_kinds_are_lowered_whole():
    model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=models.VOCAB, initializer_range=0.2, max_position_embeddings=512,
        sliding_window=4, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    plan, why = capture.repeated_layers(model, capture.probe_geometry(model))
    assert plan is None and ("kinds" in why or "windows" in why)


def test_compile_cache_and_bundle_carry_the_repeated_engines(tmp_path):
    model = _deep("llama", 6)
    config = OptimizeConfig(backend="onnxruntime", cache=CacheConfig(max_seq_len=256, prefix_cache=False))
    first = pdcompile.optimize(model, config=config, cache=tmp_path / "cache")
    second = pdcompile.optimize(model, config=config, cache=tmp_path / "cache")
    assert "cache hit" in second.pdcompile_report().timings
    ids = models.left_padded_batch(lengths=(9,))[0]
    ref = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    for fast in (first, second):
        assert torch.equal(fast.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                         do_sample=False), ref)
    pdcompile.export(first, tmp_path / "bundle")
    loaded = pdcompile.load(tmp_path / "bundle")
    assert torch.equal(loaded.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                       do_sample=False), ref)
