"""``pdcompile bench --serve``: serving under load, pdcompile's engine against its peers.

One arrival trace per rate, the same for every system: Poisson arrivals (exponential gaps,
``rate`` requests/s), prompt and output lengths drawn from lognormal distributions (median
and sigma stated in the config and the JSON; clipped to ``[min, max]``), random prompt
token ids, all from ``seed``. Outputs run to their drawn length (end-of-sequence off), so
every system does the same work. Systems, measured one after the other in one process,
each warmed up first:

* ``pdcompile-engine``: :class:`~pdcompile.engine.Engine` (continuous batching, chunked
  prefill) on its thread; requests submitted at their arrival times;
* ``hf-continuous-batching``: transformers' own ``ContinuousBatchingManager``
  (``generate_batch`` / ``transformers serve`` use it), on the HF model;
* ``pdcompile-static``: pdcompile's ``generate()`` as a static batcher: whenever the
  model is free, every request that has arrived (up to ``max_batch_size``) runs as one
  left-padded batch until its longest output is done;
* ``transformers-serve``: ``transformers serve --continuous-batching`` (the same manager
  behind its own FastAPI server) in a child process, over HTTP on loopback: streaming
  ``/v1/completions``, one client thread per request. Its completions endpoint takes text
  only, so each prompt is the decoded text of the trace's token ids (re-tokenized by the
  server: lengths differ by a few tokens; the JSON records the server's prompt counts). It
  needs the model as a folder with a tokenizer (``smollm2`` or a path, not ``r1``).

Per request: TTFT (arrival to first token), TPOT (mean gap between its later tokens).
Per system and rate: output tokens/s over the run (first arrival to last finish), TTFT and
TPOT p50/p99, whether the SLO holds (TTFT p99 < ``slo_ttft_s`` and TPOT p99 <
``slo_tpot_s``), and goodput: requests/s that met both limits themselves.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

logger = logging.getLogger(__name__)

SYSTEMS = ("pdcompile-engine", "hf-continuous-batching", "pdcompile-static", "transformers-serve")


@dataclass(frozen=True)
class LoadConfig:
    model: str = "smollm2"
    rates: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # requests/s
    num_requests: int = 64  # per rate
    seed: int = 0
    # lognormal lengths: median exp(mu), sigma; ShareGPT-like shape, means scaled to a 2-core CPU
    prompt_median: int = 128
    prompt_sigma: float = 0.8
    prompt_range: tuple[int, int] = (8, 1024)
    output_median: int = 64
    output_sigma: float = 0.6
    output_range: tuple[int, int] = (4, 256)
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.2
    systems: tuple[str, ...] = SYSTEMS
    backend: str | None = None  # pdcompile's backend (None: the default for the device)
    max_batch_size: int = 8  # pdcompile graphs' batch = the engine's max_num_seqs = the static batch
    max_prefill_tokens: int = 256  # the engine's chunk budget (and HF's max_batch_tokens)


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start of the run
    prompt: list[int]
    max_tokens: int


def trace(cfg: LoadConfig, rate: float, vocab: int, max_len: int | None = None) -> list[Arrival]:
    """The arrivals of one rate; the same seed and rate give the same trace for every system.

    ``max_len``: the model's limit; longer prompts are cut so that prompt + output fits.
    """
    rng = np.random.default_rng([cfg.seed, int(rate * 1000)])
    gaps = rng.exponential(1.0 / rate, cfg.num_requests)
    gaps[0] = 0.0

    def lengths(median, sigma, lo_hi):
        x = rng.lognormal(math.log(median), sigma, cfg.num_requests)
        return np.clip(np.round(x), *lo_hi).astype(int)

    prompts, outputs = lengths(cfg.prompt_median, cfg.prompt_sigma, cfg.prompt_range), \
        lengths(cfg.output_median, cfg.output_sigma, cfg.output_range)
    times = np.cumsum(gaps)
    if max_len is not None:
        prompts = np.minimum(prompts, max_len - outputs)
    return [Arrival(float(t), rng.integers(3, vocab, int(p)).tolist(), int(o))
            for t, p, o in zip(times, prompts, outputs)]


@dataclass
class Record:
    arrival: float
    first_token: float | None = None
    finished: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None  # as the system counted them, where it differs from the trace


def _at(t0: float, at: float) -> None:
    delay = t0 + at - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


# ------------------------------------------------------------------ systems
def run_engine(fast, arrivals: list[Arrival], cfg: LoadConfig) -> list[Record]:
    from .engine import Engine, SamplingParams

    engine = Engine(fast, max_num_seqs=cfg.max_batch_size, max_prefill_tokens=cfg.max_prefill_tokens,
                    max_queue=len(arrivals) + 1).start()
    try:
        t0, streams = time.perf_counter(), []
        for a in arrivals:
            _at(t0, a.at)
            streams.append(engine.submit(a.prompt, SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)))
        records = []
        for a, s in zip(arrivals, streams):
            m = s.result().metrics
            records.append(Record(t0 + a.at, m["first_token"], m["finished"], m["output_tokens"]))
        return records
    finally:
        engine.shutdown(cancel=True)


class HFContinuous:
    """transformers' ContinuousBatchingManager, made and started once (its set-up is not timed)."""

    def __init__(self, hf, cfg: LoadConfig, max_new: int, max_len: int):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        gen = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max_new)  # -1: no end of sequence
        page = 256  # tokens per block (HF's default page size); a pool the size of pdcompile's
        cb = ContinuousBatchingConfig(max_batch_tokens=cfg.max_prefill_tokens, max_requests_per_batch=cfg.max_batch_size,
                                      num_blocks=cfg.max_batch_size * -(-max_len // page) + 1, page_size=page)
        self.manager = hf.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        self.manager.start()
        self.ids = 0

    def __call__(self, arrivals: list[Arrival]) -> list[Record]:
        t0, records = time.perf_counter(), {}
        for a in arrivals:
            _at(t0, a.at)
            rid, self.ids = f"r{self.ids}", self.ids + 1
            self.manager.add_request(a.prompt, request_id=rid, max_new_tokens=a.max_tokens, record_timestamps=True)
            records[rid] = Record(t0 + a.at)
        pending = set(records)
        while pending:
            out = self.manager.get_result(timeout=600)
            if out is None:
                raise RuntimeError("transformers' continuous batching stopped returning results")
            if out.is_finished() and out.request_id in pending:
                if out.error:
                    raise RuntimeError(f"transformers' continuous batching failed a request: {out.error}")
                r = records[out.request_id]
                r.first_token, r.finished = out.timestamps[0], out.timestamps[-1]
                r.output_tokens = len(out.generated_tokens)
                pending.discard(out.request_id)
        return list(records.values())

    def close(self):
        self.manager.stop(block=True)


class TransformersServe:
    """``transformers serve --continuous-batching`` in a child process, driven over HTTP."""

    def __init__(self, folder: str, cfg: LoadConfig, max_len: int, port: int = 0):
        import pathlib
        import shutil
        import socket
        import subprocess
        import sys

        import httpx
        from transformers import AutoTokenizer

        self.folder, self.tokenizer = str(folder), AutoTokenizer.from_pretrained(folder)
        if not port:
            with socket.socket() as sock:  # a free loopback port
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        # the CLI of the transformers this process imports (the venv's), else the one on PATH
        exe = shutil.which("transformers", path=str(pathlib.Path(sys.executable).parent)) or "transformers"
        page = 256  # as HFContinuous: HF's default page size, a pool the size of pdcompile's
        cmd = [exe, "serve", str(folder), "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--dtype", "float32", "--cb-block-size", str(page),
               "--cb-num-blocks", str(cfg.max_batch_size * -(-max_len // page) + 1),
               "--cb-max-batch-tokens", str(cfg.max_prefill_tokens), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(600.0, connect=5.0))
        deadline = time.perf_counter() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() > deadline:
                self.close()
                raise RuntimeError("transformers serve did not answer /health within 300 s")
            time.sleep(0.5)

    def _one(self, a: Arrival, rec: Record) -> None:
        gen = {"do_sample": False, "max_new_tokens": a.max_tokens, "eos_token_id": -1}  # -1: no end of sequence
        # usage (token counts) on the stream's last event: OpenAI's stream_options, which
        # transformers serve needs from 5.25 on (5.24 sent it unasked)
        body = {"model": self.folder, "prompt": self.tokenizer.decode(a.prompt), "stream": True,
                "stream_options": {"include_usage": True}, "generation_config": json.dumps(gen)}
        with self.client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"transformers serve answered {resp.status_code}: {resp.read()[:500]!r}")
            for line in resp.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(f"transformers serve failed a request: {chunk['error']}")
                # a chunk with a choice carries one generated token, even when it decodes to ""
                # (a lone byte of a multi-byte character): the first one is the first token
                if rec.first_token is None and chunk.get("choices"):
                    rec.first_token = time.perf_counter()
                if chunk.get("usage"):
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
                    rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
        rec.finished = time.perf_counter()
        if rec.first_token is None:
            raise RuntimeError("transformers serve streamed no token for a completion")
        if rec.prompt_tokens is None:
            raise RuntimeError("transformers serve sent no usage (token counts) for a streamed completion")

    def __call__(self, arrivals: list[Arrival]) -> list[Record]:
        import threading

        t0, records, threads, errors = time.perf_counter(), [], [], []

        def run(a, rec):
            try:
                self._one(a, rec)
            except Exception as e:  # noqa: BLE001 -- reported after the run
                errors.append(e)

        for a in arrivals:
            _at(t0, a.at)
            records.append(Record(t0 + a.at))
            threads.append(threading.Thread(target=run, args=(a, records[-1]), daemon=True))
            threads[-1].start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return records

    def close(self):
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def model_folder(spec: str) -> str:
    """The folder ``transformers serve`` loads for a model spec of ``pdcompile bench``."""
    import pathlib

    from . import models

    if spec == "smollm2":
        return str(models.smollm2_path())
    if pathlib.Path(spec).is_dir():
        return spec
    raise ValueError(f"transformers-serve needs a model folder with a tokenizer (smollm2 or a path), not {spec!r}")


class _StepTimes:
    """A generate() streamer that records when each step's tokens came out."""

    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def run_static(fast, arrivals: list[Arrival], cfg: LoadConfig) -> list[Record]:
    records = [None] * len(arrivals)
    t0, nxt = time.perf_counter(), 0
    while nxt < len(arrivals):
        _at(t0, arrivals[nxt].at)  # idle until the next request if none is waiting
        now = time.perf_counter() - t0
        batch = [i for i in range(nxt, len(arrivals)) if arrivals[i].at <= now][: cfg.max_batch_size]
        nxt = batch[-1] + 1
        width = max(len(arrivals[i].prompt) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            p = arrivals[i].prompt
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        steps = _StepTimes()
        with torch.no_grad():
            fast.generate(ids, attention_mask=mask, max_new_tokens=max(arrivals[i].max_tokens for i in batch),
                          do_sample=False, eos_token_id=None, pad_token_id=0, streamer=steps)
        for i in batch:
            n = arrivals[i].max_tokens
            records[i] = Record(t0 + arrivals[i].at, steps.times[0], steps.times[n - 1], n)
    return records


# ------------------------------------------------------------------ summary
def _pct(values, q):
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summarize(records: list[Record], cfg: LoadConfig) -> dict:
    ttft = [r.first_token - r.arrival for r in records]
    tpot = [(r.finished - r.first_token) / (r.output_tokens - 1) for r in records if r.output_tokens > 1]
    span = max(r.finished for r in records) - min(r.arrival for r in records)
    good = sum(1 for r in records if r.first_token - r.arrival < cfg.slo_ttft_s and
               (r.output_tokens <= 1 or (r.finished - r.first_token) / (r.output_tokens - 1) < cfg.slo_tpot_s))
    out = {"requests": len(records), "duration_s": span,
           "output_tokens_per_s": sum(r.output_tokens for r in records) / span,
           "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
           "tpot_p50_s": _pct(tpot, 50), "tpot_p99_s": _pct(tpot, 99), "goodput_rps": good / span}
    out["slo_met"] = out["ttft_p99_s"] < cfg.slo_ttft_s and out["tpot_p99_s"] < cfg.slo_tpot_s
    return out


def run(hf, cfg: LoadConfig, progress=lambda msg: None, fast=None) -> dict:
    """Every system at every rate; returns the JSON-able results. ``fast``: ``hf`` already optimized."""
    from . import optimize

    unknown = set(cfg.systems) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from {list(SYSTEMS)}")
    folder = model_folder(cfg.model) if "transformers-serve" in cfg.systems else None  # refuse before any work
    vocab = hf.get_input_embeddings().weight.shape[0]
    limit = min(cfg.prompt_range[1] + cfg.output_range[1], getattr(hf.config, "max_position_embeddings", 1 << 30))
    if limit - cfg.output_range[1] < cfg.prompt_range[0]:
        raise ValueError(f"the model takes {limit} tokens: too few for outputs up to {cfg.output_range[1]}")
    if fast is None and any(s.startswith("pdcompile") for s in cfg.systems):
        progress("optimize")
        fast = optimize(hf, backend=cfg.backend, max_batch_size=cfg.max_batch_size, max_seq_len=limit)
    runners = {"pdcompile-engine": lambda a: run_engine(fast, a, cfg),
               "pdcompile-static": lambda a: run_static(fast, a, cfg)}
    hf_cb = hf_serve = None
    if "transformers-serve" in cfg.systems:
        progress("transformers-serve: starting the server")
        hf_serve = runners["transformers-serve"] = TransformersServe(folder, cfg, limit)
    if "hf-continuous-batching" in cfg.systems:
        progress("hf-continuous-batching: set-up")
        hf_cb = runners["hf-continuous-batching"] = HFContinuous(hf, cfg, cfg.output_range[1], limit)
    warm = [Arrival(0.0, [3 + i % (vocab - 3) for i in range(n)], 4)
            for n in (cfg.prompt_range[0], min(cfg.max_prefill_tokens + 8, cfg.prompt_range[1]))]
    results = []
    try:
        for system in cfg.systems:
            progress(f"{system}: warm-up")
            runners[system](warm)  # builds the extend graph, first-call costs
            for rate in cfg.rates:
                progress(f"{system}: {rate} requests/s, {cfg.num_requests} requests")
                arrivals = trace(cfg, rate, vocab, limit)
                records = runners[system](arrivals)
                full = all(r.output_tokens == a.max_tokens for r, a in zip(records, arrivals))
                results.append({"system": system, "rate_rps": rate, **summarize(records, cfg), "full_outputs": full,
                                "records": [asdict(r) for r in records]})
    finally:
        if hf_cb is not None:
            hf_cb.close()
        if hf_serve is not None:
            hf_serve.close()
    return {"config": asdict(cfg), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "torch_threads": torch.get_num_threads()},
            "results": results, "max_rate_within_slo": max_rate_within_slo(results)}


def max_rate_within_slo(results: list[dict]) -> dict:
    best: dict = {}
    for r in results:
        if r["slo_met"]:
            best[r["system"]] = max(best.get(r["system"], 0.0), r["rate_rps"])
    return best


def markdown_table(data: dict) -> str:
    c = data["config"]
    lines = [f"Poisson arrivals, {c['num_requests']} requests per rate, seed {c['seed']}; prompt lognormal(median "
             f"{c['prompt_median']}, sigma {c['prompt_sigma']}) in {c['prompt_range']}, output lognormal(median "
             f"{c['output_median']}, sigma {c['output_sigma']}) in {c['output_range']}; SLO TTFT p99 < "
             f"{c['slo_ttft_s']} s, TPOT p99 < {c['slo_tpot_s'] * 1000:.0f} ms.", "",
             "| system | rate req/s | output tok/s | TTFT p50 / p99 s | TPOT p50 / p99 ms | goodput req/s | SLO |",
             "|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        lines.append(f"| {r['system']} | {r['rate_rps']} | {r['output_tokens_per_s']:.1f} | "
                     f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {r['tpot_p50_s'] * 1000:.0f} / "
                     f"{r['tpot_p99_s'] * 1000:.0f} | {r['goodput_rps']:.2f} | {'yes' if r['slo_met'] else 'no'} |")
    lines += ["", "Highest rate within the SLO: " + (", ".join(f"{k} {v} req/s" for k, v in
                                                             data["max_rate_within_slo"].items()) or "none")]
    return "\n".join(lines)


def save_json(data: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for system in dict.fromkeys(r["system"] for r in data["results"]):
        rows = [r for r in data["results"] if r["system"] == system]
        rates = [r["rate_rps"] for r in rows]
        axes[0].plot(rates, [r["output_tokens_per_s"] for r in rows], "o-", label=system)
        axes[1].plot(rates, [r["ttft_p99_s"] for r in rows], "o-", label=system)
        axes[2].plot(rates, [r["tpot_p99_s"] * 1000 for r in rows], "o-", label=system)
    c = data["config"]
    axes[1].axhline(c["slo_ttft_s"], color="gray", ls="--")
    axes[2].axhline(c["slo_tpot_s"] * 1000, color="gray", ls="--")
    for ax, title in zip(axes, ("output tokens/s", "TTFT p99 (s)", "TPOT p99 (ms)")):
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
