"""Models pdcompile cannot capture raise one UnsupportedModelError that says why.

The error names the model class, the capture phase, the construct that failed and what
to do instead, and chains the original exception; torch.export's own report (and the
partial graph it prints to stderr) stays behind ``__cause__``.
"""

import pytest
import torch
import transformers as tf

import models
import pdcompile

_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=models.VOCAB, intermediate_size=128)

# Tiny configs of the model kinds pdcompile refuses up front (config check: instant).
REFUSED = {
    "mamba": (lambda: tf.MambaForCausalLM(tf.MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64, state_size=4)),
              r"layers of kind \['linear_attention'\] \(config.layer_types, MambaMixer\): state-space"),
    "jamba": (lambda: tf.JambaForCausalLM(tf.JambaConfig(
                  **_SMALL, num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
                  expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_expand=1, mamba_dt_rank=4,
                  use_mamba_kernels=False)),
              r"layers of kind \['linear_attention'\].*JambaMambaMixer"),
    "qwen3_next": (lambda: tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(
                       **_SMALL, head_dim=16, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, linear_num_value_heads=2, linear_num_key_heads=2,
                       linear_key_head_dim=16, linear_value_head_dim=16,
                       layer_types=["linear_attention", "full_attention"])),
                   r"linear_attention.*Qwen3NextGatedDeltaNet"),
    "t5": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                                              vocab_size=64, d_kv=16)),
           "encoder-decoder"),
    "bart": (lambda: tf.BartForConditionalGeneration(tf.BartConfig(
                 d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64)),
             "encoder-decoder"),
    "gemma3n": (lambda: tf.Gemma3nForCausalLM(tf.Gemma3nTextConfig(
                    **_SMALL, head_dim=16, num_kv_shared_layers=1, layer_types=["full_attention", "full_attention"],
                    laurel_rank=4, altup_num_inputs=2, hidden_size_per_layer_input=8, vocab_size_per_layer_input=256,
                    activation_sparsity_pattern=[0.0, 0.0])),
                "cross-layer KV sharing"),
    "bloom": (lambda: tf.BloomForCausalLM(tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=256)),
              r"forward does not accept \['position_ids'\]"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_before_capture(kind):
    build, construct = REFUSED[kind]
    torch.manual_seed(0)
    model = build()
    with pytest.raises(pdcompile.UnsupportedModelError, match=construct) as info:
        pdcompile.optimize(model, backend="eager", max_seq_len=64)
    err = info.value
    assert err.model_class == type(model).__name__ and err.phase == "check"
    assert str(err).startswith(f"{type(model).__name__} cannot be captured (phase: check): ")
    assert "What to do: " in str(err) and err.remedy


# --- models that pass the check but fail later: tiny Llama subclasses built here


class DataDependentLlama(tf.LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        if input_ids.max() > 200:  # a Python branch on a tensor's value
            input_ids = input_ids.clamp(max=200)
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, **kwargs)


class ShortPromptLlama(tf.LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        if input_ids.shape[1] > 16:  # a branch on the prompt length: traces for <= 16 tokens only
            input_ids = input_ids * 1
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, **kwargs)


@torch.library.custom_op("pdcompile_test::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:  # no fake kernel: torch.export cannot trace it
    return x * 2


class CustomOpLlama(tf.LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, **kwargs)
        out.logits = twice(out.logits)
        return out


class CachelessLlama(tf.LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, **kwargs):
        return super().forward(input_ids=input_ids, use_cache=False)  # ignores the cache it is given


def _tiny(cls):
    torch.manual_seed(0)
    return cls(tf.LlamaConfig(**models._GQA)).eval()


def _refusal(cls, capfd):
    with pytest.raises(pdcompile.UnsupportedModelError) as info:
        pdcompile.optimize(_tiny(cls), backend="eager", max_seq_len=64)
    err = info.value
    assert err.model_class == cls.__name__
    # torch prints the partial graph to stderr when export fails: held back
    assert "def forward(" not in capfd.readouterr().err
    return err


def test_data_dependent_control_flow(capfd):
    err = _refusal(DataDependentLlama, capfd)
    assert err.phase == "prefill"
    assert "data-dependent control flow" in err.construct
    assert "test_unsupported.py" in err.construct and "`if input_ids.max() > 200:" in err.construct
    assert "torch.where" in err.remedy
    assert type(err.__cause__).__name__ == "GuardOnDataDependentSymNode"


def test_constraint_on_a_dynamic_dim_names_the_dim_and_the_option(capfd):
    err = _refusal(ShortPromptLlama, capfd)
    assert err.phase == "prefill"
    assert "the prompt length" in err.construct and "input_ids.shape[1] <= 16" in err.construct
    assert "max_seq_len=16" in err.remedy
    assert "Constraints violated" not in str(err)
    assert "Constraints violated" in str(err.__cause__)  # torch's report is chained, not lost


def test_unsupported_operator(capfd):
    err = _refusal(CustomOpLlama, capfd)
    assert "an operation torch.export cannot trace" in err.construct and "pdcompile_test::twice" in err.construct
    assert "register_fake" in err.remedy
    assert err.__cause__ is not None


def test_model_that_ignores_the_cache(capfd):
    err = _refusal(CachelessLlama, capfd)
    assert err.phase == "probe" and "never wrote to the key/value cache" in err.construct
