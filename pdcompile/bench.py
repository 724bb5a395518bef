"""``pdcompile bench``: TTFT, TPOT, throughput against the peers and the physical limit.

Everything runs in one process. Systems are prepared once (capture + compile, timed),
then measured interleaved -- round r runs every system once before round r+1 -- after
a warm-up, and medians over rounds are reported, so machine noise hits all systems
alike. The physical floor is measured on the spot:

* memory bandwidth: streaming read (``sum``) of a buffer 16x the last-level cache;
  decode floor = bytes a step must read (weights + the KV cache so far) / bandwidth;
* fp32 matmul throughput: the best of a few large GEMMs;
  prefill floor = FLOPs of the *unpruned* prefill (every layer on every prompt
  position, lm_head on the last) / throughput.

Systems: pdcompile on each backend that runs here (and, with ``weights``, the default
backend with int8/int4 weights), the peers of :mod:`pdcompile.peers` (HF eager generate,
HF static cache + torch.compile, the ONNX Runtime path of ``transformers.exporters``) and
the CPU engines of :mod:`pdcompile.cpu_peers` (llama.cpp, ONNX Runtime GenAI, OpenVINO
GenAI; optional packages). Every system's greedy tokens are compared with HF eager's and
the table says if they differ. With ``ignore_eos`` every system generates all the tokens
asked for (HF and pdcompile get ``eos_token_id=None``, which adds no logits processor;
the engines use their own switch).
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ physical limits

def _llc_bytes() -> int:
    try:
        for index in range(4, -1, -1):
            path = f"/sys/devices/system/cpu/cpu0/cache/index{index}/size"
            if os.path.exists(path):
                with open(path) as f:
                    text = f.read().strip()
                mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
                return int(text.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return 32 << 20


def measure_bandwidth(repeats: int = 7) -> float:
    """Streaming-read bandwidth in bytes/s (all threads), over a buffer far larger than the LLC."""
    n = max(16 * _llc_bytes(), 256 << 20) // 4
    buf = torch.ones(n)
    buf.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return n * 4 / min(times)


def measure_matmul(repeats: int = 5) -> float:
    """fp32 GEMM throughput in FLOP/s (best over a few shapes typical of prefill)."""
    best = 0.0
    for m, k, n in ((512, 2048, 2048), (1024, 1024, 1024), (128, 512, 1408)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * m * k * n / min(times))
    return best


def model_costs(model, prompt_len: int, batch: int = 1) -> dict:
    """Bytes per decode step (weights) and FLOPs of the unpruned prefill, from the model's params."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    lm_head = out.weight if out is not None else emb
    unique = {p.data_ptr(): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in unique.values())
    tied = lm_head.data_ptr() == emb.data_ptr()
    # decode reads every weight once, except the embedding table (one row per sequence) unless tied
    step_bytes = total - (0 if tied else emb.numel() * emb.element_size())
    layer_params = sum(p.numel() for p in unique.values()) - emb.numel() - (0 if tied else lm_head.numel())
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    attention = 2 * batch * layers * hidden * prompt_len * prompt_len  # causal QK^T + PV
    flops = 2 * batch * (layer_params * prompt_len + lm_head.numel()) + attention
    return {"weight_bytes_per_step": step_bytes, "prefill_flops": flops}


# ------------------------------------------------------------------ systems

class PdcompileSystem:
    """pdcompile.optimize on one backend, timed with the same streamer hooks as the peers.

    The prefix cache is off: the benchmark sends the same prompt every round, and TTFT
    must be the cost of a prompt the model has not seen (the prefix cache has its own
    measurement, :func:`measure_prefix_cache`).
    """

    def __init__(self, model, backend: str, max_seq_len: int, max_batch_size: int, disable_passes=(),
                 paged: bool = True, weights: str | None = None, prefill_dtype: str = "float32"):
        self.model, self.backend, self.disable, self.paged = model, backend, tuple(disable_passes), paged
        self.max_seq_len, self.max_batch_size, self.weights = max_seq_len, max_batch_size, weights
        self.prefill_dtype = prefill_dtype
        suffix = (" (passes off)" if self.disable else "") + ("" if paged else " (contiguous KV)")
        variant = (f", {weights}" if weights else "") + (", bf16 prefill" if prefill_dtype == "bfloat16" else "")
        self.name = f"pdcompile[{backend}{variant}]{suffix}"
        self.fast = None
        self.ignore_eos = False
        self.weight_bytes = stored_weight_bytes(model, weights)

    def prepare(self, input_ids=None, attention_mask=None, max_new_tokens: int = 16) -> float:
        """Capture + compile, then one warm-up generate (as the peers' prepare does)."""
        from . import optimize

        t0 = time.perf_counter()
        self.fast = optimize(self.model, backend=self.backend, max_batch_size=self.max_batch_size,
                             max_seq_len=self.max_seq_len, disable_passes=self.disable, paged=self.paged,
                             prefix_cache=False, weights=self.weights, prefill_dtype=self.prefill_dtype)
        if input_ids is not None:
            self.generate(input_ids, attention_mask, max_new_tokens)
        return time.perf_counter() - t0

    def prepare_in_new_process(self, cfg) -> float | None:
        """prepare() in a new Python process that loads the same model (``cfg.model``): what a
        second run of a user's script pays with the compile cache. None when it fails."""
        script = (
            "import json, sys, time, torch\n"
            "from pdcompile.cli import load_model\n"
            "from pdcompile.bench import PdcompileSystem, _prompt\n"
            f"model, _ = load_model({cfg.model!r})\n"
            f"s = PdcompileSystem(model, {self.backend!r}, {self.max_seq_len}, {self.max_batch_size}, "
            f"{self.disable!r}, {self.paged!r}, {self.weights!r}, {self.prefill_dtype!r})\n"
            f"ids, mask = _prompt(1, {cfg.prompt_len}, model.get_input_embeddings().weight.shape[0])\n"
            f"t = s.prepare(ids, mask, {cfg.new_tokens})\n"
            "print(json.dumps({'prepare_s': t, 'hit': 'cache hit' in s.fast.pdcompile_report().timings}))\n"
        )
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        if proc.returncode != 0:
            logger.warning("%s: prepare in a new process failed: %s", self.name, proc.stderr.strip()[-500:])
            return None
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        if not got["hit"]:
            logger.warning("%s: the new process was not served from the compile cache", self.name)
        return got["prepare_s"]

    def generate(self, input_ids, attention_mask, max_new_tokens):
        from .timing import TimingStreamer

        # HF streamers take batch 1 only; batched runs are timed as a whole by the caller
        streamer = TimingStreamer() if input_ids.shape[0] == 1 else None
        extra = {"eos_token_id": None} if self.ignore_eos else {}
        out = self.fast.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, streamer=streamer, **extra)
        return out, (streamer.token_times if streamer else [])


def stored_weight_bytes(model, weights: str | None = None) -> int:
    """Bytes of the weights pdcompile stores for ``model`` (what a bundle holds, one copy).

    fp32: the model's parameters. int8/int4: every linear layer the quantize_weights pass
    quantizes (all of them, lm_head at ``lm_head_bits``, layers with fewer outputs than inputs
    at ``narrowing_bits``, see :class:`~pdcompile.config.QuantConfig`)
    as codes plus one fp32 scale per group; the rest (embedding, norms) stays fp32. A tied
    lm_head is quantized as its own copy while the embedding table stays fp32.
    """
    from .config import QuantConfig
    from .memory import weight_bytes
    from .passes.quantize_weights import layer_bits

    total = weight_bytes(model)
    quant = QuantConfig.parse(weights)
    if quant is None:
        return total
    tied = model.get_input_embeddings().weight.data_ptr()
    vocab = model.get_input_embeddings().weight.shape[0]
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight
            head = w.shape[0] == vocab  # as the pass recognises the output projection
            if head and not quant.lm_head:
                continue
            bits = layer_bits(quant, w.shape[0], w.shape[1], vocab)
            groups = w.numel() // quant.group_size
            codes = w.numel() * bits // 8 + groups * 4 + (0 if quant.symmetric else groups * bits // 8)
            total += codes - (0 if w.data_ptr() == tied else w.numel() * w.element_size())
    return total


@dataclass
class Result:
    name: str
    prepare_s: float = float("nan")
    convert_s: float | None = None  # the CPU engines: conversion from the HF folder ...
    load_s: float | None = None  # ... and loading the converted files (set-up = convert + load)
    weight_bytes: int | None = None  # on disk (engines) / stored (pdcompile, HF)
    prepare_warm_s: float | None = None  # prepare again in this process (compile caches warm)
    prepare_cached_s: float | None = None  # prepare in a new process served by the compile cache
    ttft_ms: float = float("nan")
    tpot_ms: float = float("nan")
    tokens_per_s: dict = field(default_factory=dict)
    rss_mb: float = float("nan")
    tokens_match_hf: bool | None = None
    error: str | None = None
    ttft_ratio: float | None = None
    tpot_ratio: float | None = None
    ttft_by_prompt_ms: dict = field(default_factory=dict)
    tpot_by_position_ms: list = field(default_factory=list)


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _prompt(batch: int, length: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    return ids, torch.ones_like(ids)


# ------------------------------------------------------------------ the benchmark

@dataclass
class BenchConfig:
    model: str = "smollm2"
    prompt_len: int = 128
    new_tokens: int = 64
    batches: tuple = (1, 8)
    repeats: int = 3
    backends: tuple = ("onnxruntime", "inductor", "eager")
    peers: tuple = ("hf-eager", "hf-static-compile", "exporters-onnx")  # and cpu_peers: "llama-cpp[:q8_0]", ...
    weights: tuple = ()  # also the default backend with these weights: "int8", "int4"
    bf16_prefill: bool = False  # also the default backend's fp32 and --weights systems with prefill_dtype=bfloat16
    ignore_eos: bool = False  # every system generates new_tokens tokens (EOS does not stop it)
    sweep_prompts: tuple = (32, 64, 128, 256, 512, 1024, 2048)
    position_tokens: int = 256
    passes_off: bool = True  # also measure the default backend with every pass but paged_kv disabled
    max_seq_len: int = 4096
    contiguous: bool = True  # also measure the default backend with the contiguous (unpaged) cache
    kv_experiments: bool = True  # paged vs contiguous KV memory; TTFT with a cached prefix vs cold
    prefix_len: int = 512
    reprepare: bool = True  # prepare pdcompile again: in a new process (compile cache) and warm in this one


def build_systems(model, cfg: BenchConfig, tokenizer=None) -> list:
    """The systems to measure; ``tokenizer`` is needed by the CPU engines (their converters)."""
    from . import cpu_peers
    from .backends import default_backend
    from .passes.bf16_matmuls import bf16_supported
    from .peers import PEERS

    systems = []
    for backend in cfg.backends:
        systems.append(PdcompileSystem(model, backend, cfg.max_seq_len, max(cfg.batches)))
    default = default_backend(torch.device("cpu"))
    for weights in cfg.weights:
        systems.append(PdcompileSystem(model, default, cfg.max_seq_len, max(cfg.batches), weights=weights))
    bf16, found = bf16_supported(torch.device("cpu")) if cfg.bf16_prefill else (False, "")
    if cfg.bf16_prefill and not bf16:
        logger.warning("bf16 prefill rows skipped: %s", found)
    elif bf16:
        # quantized weights: bf16 products on the dequantized codes (QuantConfig.prefill), decode as before
        for weights in (None, *(w + ("," if ":" in w else ":") + "prefill=dequantized" for w in cfg.weights)):
            systems.append(PdcompileSystem(model, default, cfg.max_seq_len, max(cfg.batches), weights=weights,
                                           prefill_dtype="bfloat16"))
    if cfg.passes_off:
        from .passes import ALL_PASSES

        # paged_kv stays: "passes off" is about the prefill/decode rewrites, not the cache layout
        off = tuple(p for p in ALL_PASSES if p != "paged_kv")
        systems.append(PdcompileSystem(model, default, cfg.max_seq_len, max(cfg.batches), disable_passes=off))
    if cfg.contiguous:
        systems.append(PdcompileSystem(model, default, cfg.max_seq_len, max(cfg.batches), paged=False))
    for name in cfg.peers:
        if name.partition(":")[0] in cpu_peers.ENGINES:
            systems += cpu_peers.build(name, model, tokenizer, cfg.max_seq_len)
        elif name in PEERS:
            systems.append(PEERS[name](model))
        else:
            raise ValueError(f"unknown peer {name!r}; known: {sorted(PEERS)} and {sorted(cpu_peers.ENGINES)} "
                             f"(ENGINE or ENGINE:VARIANT)")
    for system in systems:
        system.ignore_eos = cfg.ignore_eos
    return systems


def run(model, cfg: BenchConfig, progress=None, tokenizer=None) -> dict:
    """Measure every system; returns the JSON-able results."""
    from .backends import default_backend

    say = progress or (lambda msg: logger.info(msg))
    load_before = os.getloadavg()  # the machine is shared: the table says how busy it was
    vocab = model.get_input_embeddings().weight.shape[0]
    say("measuring memory bandwidth and matmul throughput")
    bandwidth, matmul = measure_bandwidth(), measure_matmul()
    costs = model_costs(model, cfg.prompt_len)
    kv_per_token = _kv_bytes_per_token(model)
    decode_floor_s = (costs["weight_bytes_per_step"] + kv_per_token * (cfg.prompt_len + cfg.new_tokens // 2)) / bandwidth
    prefill_floor_s = costs["prefill_flops"] / matmul

    systems = build_systems(model, cfg, tokenizer)
    # the HF-based peers run the model's own weights; the engines know theirs after conversion
    results = {s.name: Result(s.name, weight_bytes=getattr(s, "weight_bytes", None) or stored_weight_bytes(model))
               for s in systems}
    live = []
    ids, mask = _prompt(1, cfg.prompt_len, vocab)
    for s in systems:
        say(f"preparing {s.name}")
        rss0 = _rss_mb()
        try:
            results[s.name].prepare_s = s.prepare(ids, mask, cfg.new_tokens)
            live.append(s)
            for key in ("convert_s", "load_s", "weight_bytes"):  # the CPU engines know theirs after set-up
                if getattr(s, key, None) is not None:
                    setattr(results[s.name], key, getattr(s, key))
        except Exception as e:  # a system that cannot run here is reported, not fatal
            results[s.name].error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            logger.warning("%s failed to prepare: %s", s.name, results[s.name].error)
        results[s.name].rss_mb = _rss_mb() - rss0

    # Every system's graphs, programs and models are alive now: millions of objects that a
    # full garbage collection would walk in the middle of a timed call (seen as +10 ms on
    # single TTFTs). Freezing them out of the collector's reach measures each system as a
    # long-running server sees it, and alike for all.
    gc.collect()
    gc.freeze()
    reference = None
    per_round: dict[str, list] = {s.name: [] for s in live}
    throughput: dict[str, dict[int, list]] = {s.name: {b: [] for b in cfg.batches} for s in live}
    for r in range(cfg.repeats + 1):  # round 0 is the warm-up
        say(f"round {r}/{cfg.repeats} (0 = warm-up)")
        for s in list(live):
            try:
                t0 = time.perf_counter()
                out, times = s.generate(ids, mask, cfg.new_tokens)
                ttft = times[0] - t0
                gaps = [b - a for a, b in zip(times, times[1:])]
                if reference is None and s.name == "hf-eager":
                    reference = out
                if r:
                    per_round[s.name].append((ttft, statistics.median(gaps)))
                    results[s.name]._out = out
                for b in cfg.batches:
                    if b > getattr(s, "max_batch", b):  # an engine measured at batch 1 only
                        continue
                    if b == 1:
                        total = times[-1] - t0
                        tps = cfg.new_tokens / total
                    else:
                        bids, bmask = _prompt(b, cfg.prompt_len, vocab, seed=b)
                        t0 = time.perf_counter()
                        bout, btimes = s.generate(bids, bmask, cfg.new_tokens)
                        tps = b * (bout.shape[1] - cfg.prompt_len) / (time.perf_counter() - t0)
                    if r:
                        throughput[s.name][b].append(tps)
            except Exception as e:
                results[s.name].error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                logger.warning("%s failed: %s", s.name, results[s.name].error)
                live.remove(s)
    for s in live:
        res = results[s.name]
        res.ttft_ms = statistics.median(v[0] for v in per_round[s.name]) * 1e3
        res.tpot_ms = statistics.median(v[1] for v in per_round[s.name]) * 1e3
        res.tokens_per_s = {str(b): statistics.median(v) for b, v in throughput[s.name].items() if v}
        res.ttft_ratio = res.ttft_ms / 1e3 / prefill_floor_s
        res.tpot_ratio = res.tpot_ms / 1e3 / decode_floor_s
        if reference is not None:
            res.tokens_match_hf = bool(torch.equal(res._out, reference))
        del res._out

    # sweeps for the plots: TTFT by prompt length, TPOT by position
    for length in cfg.sweep_prompts:
        if length + 2 > cfg.max_seq_len:
            continue
        sids, smask = _prompt(1, length, vocab, seed=length)
        say(f"TTFT sweep: prompt {length}")
        for s in live:
            vals = []
            for _ in range(2):
                t0 = time.perf_counter()
                _, times = s.generate(sids, smask, 1)
                vals.append((times[0] - t0) * 1e3)
            results[s.name].ttft_by_prompt_ms[str(length)] = min(vals)
    if cfg.position_tokens > 0:  # 0: skip the TPOT-by-position plot
        say(f"TPOT by position: {cfg.position_tokens} tokens")
        pids, pmask = _prompt(1, 32, vocab, seed=7)
        for s in live:
            _, times = s.generate(pids, pmask, cfg.position_tokens)
            results[s.name].tpot_by_position_ms = [(b - a) * 1e3 for a, b in zip(times, times[1:])]

    # Prepare with the compile caches filled by the cold prepare above: pdcompile's own
    # (engines of the exportable backends, see compile_cache.py), in a new process and again
    # in this one; the eager backend has no engine to cache (its second prepare repeats the
    # first and is not measured).
    from .api import _compile_cache

    for s in systems:
        if (cfg.reprepare and isinstance(s, PdcompileSystem) and _compile_cache(None, s.backend) is not None
                and s.name in [x.name for x in live]):
            say(f"preparing {s.name} in a new process (compile cache)")
            results[s.name].prepare_cached_s = s.prepare_in_new_process(cfg)
            say(f"re-preparing {s.name} (warm)")
            results[s.name].prepare_warm_s = s.prepare(ids, mask, cfg.new_tokens)
        gc.collect()

    extras = {}
    default = next((s for s in live if isinstance(s, PdcompileSystem) and not s.disable and s.paged
                    and s.backend == default_backend(torch.device("cpu"))), None)
    contiguous = next((s for s in live if isinstance(s, PdcompileSystem) and not s.paged), None)
    if cfg.kv_experiments and default is not None:
        if contiguous is not None:
            say("KV memory of a mixed-length batch: paged vs contiguous")
            extras["kv_memory"] = measure_kv_memory(default.fast, contiguous.fast, vocab, cfg.new_tokens)
        if cfg.prefix_len + 64 <= cfg.max_seq_len:
            say(f"TTFT with a cached {cfg.prefix_len}-token prefix vs cold")
            extras["prefix_cache"] = measure_prefix_cache(model, default.backend, cfg, vocab)

    gc.unfreeze()
    return {
        "machine": {**machine_info(), "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": cfg.model,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "limits": {
            "memory_bandwidth_GBps": bandwidth / 1e9,
            "matmul_GFLOPps": matmul / 1e9,
            "weight_bytes_per_step": costs["weight_bytes_per_step"],
            "kv_bytes_per_token": kv_per_token,
            "decode_floor_ms": decode_floor_s * 1e3,
            "prefill_flops_unpruned": costs["prefill_flops"],
            "prefill_floor_ms": prefill_floor_s * 1e3,
        },
        "results": [asdict(r) for r in results.values()],
        **extras,
    }


def measure_kv_memory(paged, contiguous, vocab: int, new_tokens: int, lengths=(24, 100, 300, 700)) -> dict:
    """KV bytes one left-padded batch of very different prompt lengths holds, on the paged
    runner (whole blocks per row) and on the contiguous one (every row sized for the longest)."""
    lengths = [n for n in lengths if n + new_tokens <= min(paged.runner.max_seq_len, contiguous.runner.max_seq_len)]
    width = max(lengths)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    out = {}
    tokens = {}
    for name, fast in (("paged", paged), ("contiguous", contiguous)):
        tokens[name] = fast.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
        out[f"{name}_bytes"] = fast.runner.kv.last_batch_bytes
    per_token = paged.runner.geometry.bytes_per_token()
    out.update(
        prompt_lengths=lengths, new_tokens=new_tokens, block_size=paged.runner.kv.block_size,
        live_token_bytes=sum(n + new_tokens for n in lengths) * per_token,
        tokens_identical=bool(torch.equal(tokens["paged"], tokens["contiguous"])),
    )
    return out


def measure_prefix_cache(model, backend: str, cfg: "BenchConfig", vocab: int, question: int = 32) -> dict:
    """TTFT of a prompt whose first ``cfg.prefix_len`` tokens are already in the pool (a
    shared system prompt) against the same length cold (a prefix never seen), interleaved,
    medians; the warm call's tokens are checked against HF eager."""
    from . import optimize
    from .timing import TimingStreamer

    fast = optimize(model, backend=backend, max_batch_size=1, max_seq_len=cfg.max_seq_len, prefix_cache=True)
    gc.collect()
    gc.freeze()  # as in run(): no full collection inside a timed call
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, vocab, (1, cfg.prefix_len), generator=g)

    def ttft(ids):
        streamer = TimingStreamer()
        t0 = time.perf_counter()
        out = fast.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                            do_sample=False, streamer=streamer)
        return (streamer.token_times[0] - t0) * 1e3, out, fast.last_timings.reused_tokens[0]

    def question_ids():
        return torch.randint(3, vocab, (1, question), generator=g)

    ttft(torch.cat([shared, question_ids()], 1))  # registers the prefix; builds the extend graph
    ttft(torch.cat([torch.randint(3, vocab, (1, cfg.prefix_len), generator=g), question_ids()], 1))
    cold, warm, reused = [], [], 0
    for _ in range(max(cfg.repeats, 5)):
        c, _, r_cold = ttft(torch.cat([torch.randint(3, vocab, (1, cfg.prefix_len), generator=g), question_ids()], 1))
        prompt = torch.cat([shared, question_ids()], 1)
        w, out, reused = ttft(prompt)
        cold.append(c)
        warm.append(w)
        if r_cold:
            raise RuntimeError("a cold prompt hit the prefix cache; the measurement is invalid")
    with torch.no_grad():
        ref = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    return {
        "prefix_len": cfg.prefix_len, "question_len": question, "reused_tokens": reused,
        "cold_ttft_ms": statistics.median(cold), "cached_ttft_ms": statistics.median(warm),
        "tokens_match_hf": bool(torch.equal(out, ref)),
    }


def _kv_bytes_per_token(model) -> int:
    from .capture import probe_geometry

    return probe_geometry(model).bytes_per_token()


def machine_info() -> dict:
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu_flags": _simd_flags(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for package in ("onnxruntime", "llama-cpp-python", "onnxruntime-genai", "openvino", "openvino-genai"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            pass
    return info


def _simd_flags() -> list[str]:
    """The CPU's vector / matrix extensions (what decides the engines' kernels)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(f for f in line.split(":", 1)[1].split()
                                  if f in ("avx", "avx2", "fma", "f16c") or f.startswith(("avx512", "amx", "avx_vnni")))
    except OSError:
        pass
    return []


# ------------------------------------------------------------------ output

def markdown_table(data: dict) -> str:
    lim = data["limits"]
    lines = [
        f"Model `{data['model']}`, prompt {data['config']['prompt_len']}, {data['config']['new_tokens']} new tokens, "
        f"greedy; median of {data['config']['repeats']} interleaved rounds after a warm-up. "
        f"Floors measured in the same run: memory bandwidth {lim['memory_bandwidth_GBps']:.1f} GB/s -> decode floor "
        f"{lim['decode_floor_ms']:.2f} ms/token; fp32 matmul {lim['matmul_GFLOPps']:.0f} GFLOP/s -> unpruned prefill "
        f"floor {lim['prefill_floor_ms']:.1f} ms." + _load_note(data["machine"]),
        "",
        "| system | TTFT ms | x floor | TPOT ms/token | x floor | tok/s b=1 | tok/s b=8 | prepare s (cold / cached, new process / warm; engines: convert + load) | weights MB | RSS +MB | tokens = HF |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["results"]:
        if r["error"]:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | | | | |")
            continue
        tps = r["tokens_per_s"]
        warm = "".join(f" / {r[k]:.1f}" if r.get(k) is not None else " / -"
                       for k in ("prepare_cached_s", "prepare_warm_s")) if r.get("prepare_warm_s") is not None else ""
        prepare = (f"{r['convert_s']:.1f} + {r['load_s']:.1f}" if r.get("convert_s") is not None
                   else f"{r['prepare_s']:.1f}{warm}")
        weights = f"{r['weight_bytes'] / 1e6:.0f}" if r.get("weight_bytes") else "-"
        rates = " | ".join(f"{tps[b]:.1f}" if b in tps else "-" for b in ("1", "8"))
        lines.append(
            f"| {r['name']} | {r['ttft_ms']:.1f} | {r['ttft_ratio']:.2f} | {r['tpot_ms']:.2f} | {r['tpot_ratio']:.2f} | "
            f"{rates} | {prepare} | {weights} | "
            f"{r['rss_mb']:.0f} | {'yes' if r['tokens_match_hf'] else 'NO' if r['tokens_match_hf'] is False else '-'} |"
        )
    kv = data.get("kv_memory")
    if kv:
        mib = 2**20
        lines += [
            "",
            f"KV cache of one left-padded batch, prompts {kv['prompt_lengths']} + {kv['new_tokens']} new tokens "
            f"(tokens identical paged vs contiguous: {'yes' if kv['tokens_identical'] else 'NO'}):",
            "",
            "| layout | KV MiB held | x live tokens |",
            "| --- | --- | --- |",
            f"| live tokens (lower bound) | {kv['live_token_bytes'] / mib:.1f} | 1.00 |",
            f"| paged ({kv['block_size']}-token blocks) | {kv['paged_bytes'] / mib:.1f} | {kv['paged_bytes'] / kv['live_token_bytes']:.2f} |",
            f"| contiguous | {kv['contiguous_bytes'] / mib:.1f} | {kv['contiguous_bytes'] / kv['live_token_bytes']:.2f} |",
        ]
    pc = data.get("prefix_cache")
    if pc:
        lines += [
            "",
            f"Prefix cache: prompt = {pc['prefix_len']}-token shared prefix + {pc['question_len']}-token question; "
            f"cold TTFT {pc['cold_ttft_ms']:.1f} ms, cached-prefix TTFT {pc['cached_ttft_ms']:.1f} ms "
            f"({pc['cold_ttft_ms'] / pc['cached_ttft_ms']:.1f}x faster, {pc['reused_tokens']} tokens reused; "
            f"tokens = HF: {'yes' if pc['tokens_match_hf'] else 'NO'}).",
        ]
    return "\n".join(lines)


def _load_note(machine: dict) -> str:
    """The load average around the run: other work on the machine slows every system."""
    if "load_average_before" not in machine:
        return ""
    before, after = machine["load_average_before"][0], machine["load_average_after"][0]
    busy = max(before, after) > 1.25 * machine["cores"]
    return (f" Load average (1 min) {before:.1f} before, {after:.1f} after on {machine['cores']} cores"
            + (": CONTENDED, other work shared the cores." if busy else "."))


def plot(data: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install 'pdcompile[bench]'") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5))
    for r in data["results"]:
        if r["error"]:
            continue
        xs = sorted(int(k) for k in r["ttft_by_prompt_ms"])
        if xs:
            a.plot(xs, [r["ttft_by_prompt_ms"][str(x)] for x in xs], marker="o", label=r["name"])
        if r["tpot_by_position_ms"]:
            b.plot(range(33, 33 + len(r["tpot_by_position_ms"])), r["tpot_by_position_ms"], label=r["name"], lw=1)
    lim = data["limits"]
    a.set(xscale="log", yscale="log", xlabel="prompt length (tokens)", ylabel="TTFT (ms)", title="TTFT vs prompt length")
    b.axhline(lim["decode_floor_ms"], color="k", ls="--", lw=1, label="bandwidth floor")
    b.set(xlabel="position in the sequence", ylabel="TPOT (ms/token)", title="TPOT vs position")
    # one-off spikes (a peer recompiling for a longer cache: seconds) would flatten every
    # line; clip at 3x the slowest system's median step and say so
    medians = [statistics.median(r["tpot_by_position_ms"]) for r in data["results"] if r["tpot_by_position_ms"]]
    top = 3 * max(medians) if medians else None
    spikes = [r["name"] for r in data["results"] if top and any(v > top for v in r["tpot_by_position_ms"])]
    b.set_ylim(bottom=0, top=top)
    if spikes:
        b.set_title(f"TPOT vs position (clipped at {top:.0f} ms: spikes in {', '.join(spikes)})", fontsize=9)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{data['model']} on {data['machine']['cpu']} ({data['machine']['torch_threads']} threads), {data['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save_json(data: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
