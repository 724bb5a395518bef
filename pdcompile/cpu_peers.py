"""The CPU engines users pick instead of pdcompile: llama.cpp, ONNX Runtime GenAI, OpenVINO GenAI.

Each peer starts from the same place a user does, the model's Hugging Face folder
(``save_pretrained`` of the model and its tokenizer into a temporary folder), converts it
with the engine's own tool, loads the result, and generates greedily from token ids::

    llama-cpp        convert_hf_to_gguf.py --outtype f32 | q8_0 (llama.cpp's converter),
                     q4_0 through llama.cpp's own quantizer (llama_model_quantize)
    ort-genai        python -m onnxruntime_genai.models.builder -p fp32 | int4 -e cpu
    openvino-genai   optimum-cli export openvino --weight-format fp32 | int8 | int4

Fairness rules, the same for every engine (and for HF eager / pdcompile in ``bench``):

* the same prompt token ids, batch 1 (llama-cpp-python runs one sequence; the other two
  are measured alike), the same number of new greedy tokens;
* the thread count is torch's (``torch.get_num_threads()``);
* no state kept between runs: llama.cpp's context is reset (its ``generate`` otherwise
  reuses the longest common prefix of the last prompt), ONNX Runtime GenAI gets a new
  generator per run, OpenVINO GenAI's prefix caching is switched off;
* ``ignore_eos``: each engine's own switch (llama.cpp: the loop here does not stop;
  ONNX Runtime GenAI: ``min_length``, which masks EOS out; OpenVINO GenAI:
  ``GenerationConfig.ignore_eos``), so every system produces all the tokens asked for.

``convert_s`` and ``load_s`` are measured separately (set-up = convert + load; saving
the HF folder is not counted, every engine starts from it), and ``weight_bytes`` is the
size on disk of the files holding the weights.

The packages are optional (``pip install 'pdcompile[peers]'`` or ``make bench-peers``)
and imported only when a peer is set up. Two converters do not come from that extra:

* llama.cpp's ``convert_hf_to_gguf.py`` ships in llama-cpp-python's source distribution,
  not in its wheel: ``make bench-peers`` unpacks it, and ``$PDCOMPILE_LLAMA_CPP_CONVERTER``
  (or ``<venv>/src/llama.cpp/convert_hf_to_gguf.py``) points at it;
* ``optimum-cli`` (optimum-intel) caps transformers below 5.6, older than pdcompile's:
  ``make bench-peers`` installs it in a venv of its own and ``$PDCOMPILE_OPTIMUM_CLI``
  points at it (else ``optimum-cli`` on PATH).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

from .peers import Peer

INSTALL_HINT = "pip install 'pdcompile[peers]' (or `make bench-peers`, which also fetches the converters)"


def _require(module: str, engine: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"the {engine} peer needs the package that provides {module!r}: {INSTALL_HINT}") from error


def _run(cmd: list[str], what: str) -> None:
    """Run a converter; its failure is an error that shows the end of its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-1500:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX-512 BF16 or AMX), where OpenVINO defaults to bf16."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


class ConvertedPeer(Peer):
    """A peer that converts the model's HF folder with its engine's tool, then loads the result.

    Subclasses name their ``engine`` and ``variants`` and implement ``_convert``,
    ``_load`` and ``_generate_tokens``.
    """

    engine = ""
    module = ""  # the engine's Python package, imported when the peer is set up
    variants: tuple = ()
    weight_files: tuple = ()  # names (glob patterns) of the converted files that hold the weights
    max_batch = 1  # bench measures batch > 1 throughput only where a system runs it

    def __init__(self, model, tokenizer, variant: str, max_seq_len: int = 4096):
        super().__init__(model)
        if variant not in self.variants:
            raise ValueError(f"{self.engine}: unknown variant {variant!r}; known: {list(self.variants)}")
        self.tokenizer, self.variant, self.max_seq_len = tokenizer, variant, max_seq_len
        self.name = f"{self.engine}[{variant}]"
        self.ignore_eos = False
        self.convert_s = self.load_s = self.weight_bytes = None
        self.loaded = None
        self.workdir: Path | None = None

    def _setup(self):
        _require(self.module, self.engine)  # before any work: a missing package names the extra
        if self.tokenizer is None:
            raise ValueError(
                f"{self.engine} converts from an HF folder that must include the model's tokenizer "
                "(its converter writes the vocabulary into the converted files); this model has none"
            )
        self.workdir = Path(tempfile.mkdtemp(prefix=f"pdcompile-{self.engine}-{self.variant}-"))
        weakref.finalize(self, shutil.rmtree, self.workdir, True)
        source, out = self.workdir / "hf", self.workdir / "converted"
        self.model.save_pretrained(source)
        self.tokenizer.save_pretrained(source)
        start = time.perf_counter()
        self._convert(source, out)
        self.convert_s = time.perf_counter() - start
        self.weight_bytes = sum(p.stat().st_size for pattern in self.weight_files for p in out.glob(pattern))
        start = time.perf_counter()
        self.loaded = self._load(out)
        self.load_s = time.perf_counter() - start

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

    def generate(self, input_ids, attention_mask, max_new_tokens):
        if self.loaded is None:
            raise RuntimeError(f"call prepare() first: it converts and loads the model for {self.name}")
        if input_ids.shape[0] != self.max_batch or not bool(attention_mask.all()):
            raise NotImplementedError(f"{self.name} is measured at batch 1 without padding; got {tuple(input_ids.shape)}")
        if input_ids.shape[1] + max_new_tokens > self.max_seq_len:
            raise ValueError(f"{self.name}: prompt {input_ids.shape[1]} + {max_new_tokens} new tokens exceeds "
                             f"its context of {self.max_seq_len} tokens")
        tokens, times = self._generate_tokens(input_ids[0].tolist(), max_new_tokens)
        new = torch.tensor([tokens], dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([input_ids, new], dim=1), times

    def _convert(self, source: Path, out: Path) -> None:
        raise NotImplementedError

    def _load(self, out: Path):
        raise NotImplementedError

    def _generate_tokens(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
        raise NotImplementedError

    def prompt_logits(self, ids: list[int]):
        """The engine's next-token logits at every position of ``ids`` (a fresh context):
        a float32 array of shape (len(ids), vocab), for perplexity (benchmarks/accuracy.py)."""
        if self.loaded is None:
            raise RuntimeError(f"call prepare() first: it converts and loads the model for {self.name}")
        if not 0 < len(ids) <= self.max_seq_len:
            raise ValueError(f"{self.name}: scores 1 to {self.max_seq_len} tokens at once; got {len(ids)}")
        return self._prompt_logits(ids)

    def _prompt_logits(self, ids: list[int]):
        raise NotImplementedError


def llama_cpp_converter() -> Path:
    """llama.cpp's HF -> GGUF converter (from llama-cpp-python's source distribution)."""
    path = Path(os.environ.get("PDCOMPILE_LLAMA_CPP_CONVERTER",
                               Path(sys.prefix) / "src" / "llama.cpp" / "convert_hf_to_gguf.py"))
    if not path.is_file():
        raise FileNotFoundError(
            f"llama.cpp's converter is not at {path}: it ships in llama-cpp-python's source distribution, "
            "not in its wheel; `make bench-peers` unpacks it there, or set $PDCOMPILE_LLAMA_CPP_CONVERTER "
            "to a convert_hf_to_gguf.py matching the installed llama-cpp-python"
        )
    return path


class LlamaCpp(ConvertedPeer):
    """llama.cpp through llama-cpp-python: GGUF f32, Q8_0 (converter) or Q4_0 (llama.cpp's quantizer)."""

    engine = "llama-cpp"
    module = "llama_cpp"
    variants = ("f32", "q8_0", "q4_0")
    weight_files = ("model.gguf",)

    def _convert(self, source, out):
        import llama_cpp

        out.mkdir()
        # Q4_0 comes from the f32 file through llama.cpp's own quantizer (the converter
        # writes f32/f16/bf16/q8_0 only); groups of 32 divide every hidden size measured here.
        outtype = "f32" if self.variant == "q4_0" else self.variant
        gguf = out / ("model-f32.gguf" if self.variant == "q4_0" else "model.gguf")
        _run([sys.executable, str(llama_cpp_converter()), str(source), "--outfile", str(gguf), "--outtype", outtype],
             "llama.cpp's convert_hf_to_gguf.py")
        if self.variant == "q4_0":
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
            params.nthread = torch.get_num_threads()
            if llama_cpp.llama_model_quantize(str(gguf).encode(), str(out / "model.gguf").encode(), params) != 0:
                raise RuntimeError(f"llama.cpp could not quantize {gguf} to Q4_0")
            gguf.unlink()

    def _load(self, out):
        import llama_cpp

        threads = torch.get_num_threads()
        return llama_cpp.Llama(
            model_path=str(out / "model.gguf"), n_ctx=self.max_seq_len, n_threads=threads, n_threads_batch=threads,
            n_batch=512, verbose=False,
        )

    def _generate_tokens(self, ids, max_new_tokens):
        llm, eos = self.loaded, self._eos_ids()
        # Without reset() the next generate() skips the prompt tokens it already holds.
        llm.reset()
        tokens, times = [], []
        # temp=0 is llama.cpp's greedy sampler; no repetition penalty (HF's greedy has none).
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(token)
            times.append(time.perf_counter())
            if len(tokens) == max_new_tokens or (token in eos and not self.ignore_eos):
                break
        return tokens, times

    def _prompt_logits(self, ids):
        import numpy as np

        import llama_cpp

        # The generating context keeps only the last position's logits; scoring needs every
        # position (logits_all), which would slow the timed prefill, so it gets its own context.
        if getattr(self, "_scorer", None) is None:
            threads = torch.get_num_threads()
            self._scorer = llama_cpp.Llama(
                model_path=str(self.workdir / "converted" / "model.gguf"), n_ctx=self.max_seq_len,
                n_threads=threads, n_threads_batch=threads, n_batch=512, logits_all=True, verbose=False,
            )
        self._scorer.reset()
        self._scorer.eval(ids)
        return np.array(self._scorer.scores[: len(ids)], dtype=np.float32)


class OrtGenAI(ConvertedPeer):
    """ONNX Runtime GenAI: its model builder's fp32 or int4 graph, its generator loop."""

    engine = "ort-genai"
    module = "onnxruntime_genai"
    variants = ("fp32", "int4")
    weight_files = ("*.onnx", "*.onnx.data")

    def _convert(self, source, out):
        _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(source), "-o", str(out),
              "-p", self.variant, "-e", "cpu", "-c", str(self.workdir / "builder-cache")],
             "onnxruntime_genai.models.builder")
        # The builder leaves ONNX Runtime's default pool (every core); use torch's count.
        config_path = out / "genai_config.json"
        config = json.loads(config_path.read_text())
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = torch.get_num_threads()
        config_path.write_text(json.dumps(config, indent=4))

    def _load(self, out):
        import onnxruntime_genai as og

        return og.Model(str(out))

    def _generate_tokens(self, ids, max_new_tokens):
        import numpy as np

        import onnxruntime_genai as og

        total = len(ids) + max_new_tokens
        params = og.GeneratorParams(self.loaded)
        options = {"do_sample": False, "max_length": total}
        if self.ignore_eos:
            options["min_length"] = total
        params.set_search_options(**options)
        generator = og.Generator(self.loaded, params)  # a new generator: no state from the last run
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        tokens, times = [], []
        while not generator.is_done() and len(tokens) < max_new_tokens:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            times.append(time.perf_counter())
        return tokens, times

    def _prompt_logits(self, ids):
        import numpy as np

        import onnxruntime_genai as og

        params = og.GeneratorParams(self.loaded)
        params.set_search_options(do_sample=False, max_length=len(ids) + 1)
        generator = og.Generator(self.loaded, params)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        # the builder's graph returns logits for every prompt position on the prompt's run
        logits = np.asarray(generator.get_output("logits"), dtype=np.float32)
        if logits.shape[:2] != (1, len(ids)):
            raise RuntimeError(f"{self.name}: expected logits for {len(ids)} positions, got shape {logits.shape}")
        return logits[0]


def optimum_cli() -> str:
    cli = os.environ.get("PDCOMPILE_OPTIMUM_CLI") or shutil.which("optimum-cli")
    if cli is None or not os.path.isfile(cli):
        raise FileNotFoundError(
            f"OpenVINO's converter (optimum-cli, optimum-intel[openvino]) was not found ({cli or 'not on PATH'}): "
            "optimum-intel caps transformers below pdcompile's, so `make bench-peers` installs it in a venv of "
            "its own; set $PDCOMPILE_OPTIMUM_CLI to that venv's bin/optimum-cli"
        )
    return cli


class OpenVINOGenAI(ConvertedPeer):
    """OpenVINO GenAI's LLMPipeline on ``optimum-cli export openvino`` output.

    ``fp32`` forces fp32 compute (``INFERENCE_PRECISION_HINT=f32``, and an f32 KV cache);
    ``fp32-default`` keeps the CPU plugin's default precision, which is bf16 compute and
    a u8 KV cache on CPUs with AVX-512 BF16 / AMX (the same as ``fp32`` elsewhere).
    ``int4`` uses groups of 128 weights, or 64 / 32 where the hidden size is not a
    multiple of 128 (SmolLM2: 576).
    """

    engine = "openvino-genai"
    module = "openvino_genai"
    variants = ("fp32", "fp32-default", "int8", "int4")
    weight_files = ("openvino_model.xml", "openvino_model.bin")

    def _convert(self, source, out):
        weight_format = "fp32" if self.variant.startswith("fp32") else self.variant
        cmd = [optimum_cli(), "export", "openvino", "--model", str(source), "--task", "text-generation-with-past",
               "--weight-format", weight_format]
        if self.variant == "int4":
            hidden = self.model.config.get_text_config(decoder=True).hidden_size
            group = next(g for g in (128, 64, 32, 16) if hidden % g == 0)
            cmd += ["--group-size", str(group), "--ratio", "1.0"]
        _run(cmd + [str(out)], "optimum-cli export openvino")

    def _load(self, out):
        import openvino_genai as ov_genai

        scheduler = ov_genai.SchedulerConfig()
        scheduler.enable_prefix_caching = False  # on by default: every round would reuse the prompt
        properties = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
        if self.variant != "fp32-default":
            properties.update(INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32")
        return ov_genai.LLMPipeline(str(out), "CPU", scheduler_config=scheduler, **properties)

    def _generate_tokens(self, ids, max_new_tokens):
        import numpy as np
        import openvino as ov
        import openvino_genai as ov_genai

        times = []

        class Streamer(ov_genai.StreamerBase):
            # write() gets the token ids as the pipeline produces them
            def write(self, token):
                now = time.perf_counter()
                times.extend([now] * (len(token) if isinstance(token, list) else 1))
                return ov_genai.StreamingStatus.RUNNING

            def end(self):
                pass

        config = ov_genai.GenerationConfig()
        config.max_new_tokens = max_new_tokens
        config.do_sample = False
        config.ignore_eos = self.ignore_eos
        if self._eos_ids():
            config.stop_token_ids = self._eos_ids()
        prompt = np.asarray([ids], dtype=np.int64)
        inputs = ov_genai.TokenizedInputs(ov.Tensor(prompt), ov.Tensor(np.ones_like(prompt)))
        result = self.loaded.generate(inputs, config, Streamer())
        tokens = list(result.tokens[0])
        return tokens, times[: len(tokens)]

    def _prompt_logits(self, ids):
        import numpy as np
        import openvino as ov

        # LLMPipeline returns tokens, not logits: score with the exported (stateful) model
        # itself, compiled with the same precision settings as the pipeline.
        if getattr(self, "_scorer", None) is None:
            properties = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
            if self.variant != "fp32-default":
                properties["INFERENCE_PRECISION_HINT"] = "f32"
            compiled = ov.Core().compile_model(str(self.workdir / "converted" / "openvino_model.xml"), "CPU",
                                               properties)
            self._scorer = compiled.create_infer_request()
        request = self._scorer
        request.reset_state()
        prompt = np.asarray([ids], dtype=np.int64)
        inputs = {"input_ids": prompt, "attention_mask": np.ones_like(prompt),
                  "position_ids": np.arange(len(ids), dtype=np.int64)[None], "beam_idx": np.zeros(1, dtype=np.int32)}
        names = {name for port in request.model_inputs for name in port.get_names()}
        request.infer({k: v for k, v in inputs.items() if k in names})
        logits = np.asarray(request.get_tensor("logits").data, dtype=np.float32)
        return logits[0, -len(ids):]


ENGINES = {peer.engine: peer for peer in (LlamaCpp, OrtGenAI, OpenVINOGenAI)}


def default_variants(engine: str) -> tuple:
    """The rows ``--peers ENGINE`` measures: every variant, but OpenVINO's default-precision
    row only where that default differs from fp32 (a CPU with bf16)."""
    variants = ENGINES[engine].variants
    if engine == "openvino-genai" and not cpu_has_bf16():
        variants = tuple(v for v in variants if v != "fp32-default")
    return variants


def build(spec: str, model, tokenizer, max_seq_len: int) -> list[ConvertedPeer]:
    """``ENGINE`` (every default variant) or ``ENGINE:VARIANT`` -> the peers to measure."""
    engine, _, variant = spec.partition(":")
    if engine not in ENGINES:
        raise ValueError(f"unknown CPU engine {engine!r}; known: {sorted(ENGINES)}")
    variants = (variant,) if variant else default_variants(engine)
    return [ENGINES[engine](model, tokenizer, v, max_seq_len) for v in variants]
