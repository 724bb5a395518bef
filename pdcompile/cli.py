"""Command line: ``pdcompile run | inspect | export | generate | verify | bench | serve | cache``."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import time
import warnings

import torch

from .config import PREFILL_DTYPES

logger = logging.getLogger("pdcompile.cli")

DEFAULT_PROMPT = "Write a short story about a robot who learns to paint."


def _console():
    try:
        import shutil

        from rich.console import Console

        # wide enough for the report table when the output is a pipe or a log; bound to the
        # real stdout now, so that holding back third-party prints (_held_output) spares it
        return Console(file=sys.stdout, width=max(shutil.get_terminal_size((160, 24)).columns, 160))
    except ImportError:
        return None


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    try:
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(file=sys.stdout), show_path=False, log_time_format="[%X]")
        logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler])
    except ImportError:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("pdcompile").setLevel(level)
    if not verbose:
        quiet_third_party()


# Libraries whose warnings and progress lines are theirs, not pdcompile's.
THIRD_PARTY_LOGGERS = ("torch", "transformers", "huggingface_hub", "accelerate", "onnxscript", "onnx_ir", "onnxruntime")


def quiet_third_party() -> None:
    """Without -v the commands print pdcompile's own progress only.

    Switched off: Python warnings not raised by pdcompile (FutureWarning, deprecations),
    third-party loggers below ERROR (torch's "torchvision is not installed" lines, ...),
    transformers' progress bars, and pdcompile's per-pass details (DEBUG-level detail,
    shown with -v like everything else). torch.onnx's progress prints are held back
    around the calls that lower (:class:`_held_output`).
    """
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"pdcompile(\.|$)")
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("pdcompile.passes").setLevel(logging.WARNING)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


class _held_output:
    """Hold back what third-party code prints to stdout (torch.onnx's "[torch.onnx] ..."
    progress) unless ``verbose``; pdcompile's own output goes to consoles bound earlier."""

    def __init__(self, verbose: bool):
        self.redirect = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())

    def __enter__(self):
        self.redirect.__enter__()

    def __exit__(self, *exc):
        self.redirect.__exit__(*exc)


class _progress:
    """A spinner naming the running stage (the stages are also logged with durations)."""

    def __init__(self, console, text: str):
        self.console, self.text = console, text

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.status = self.console.status(self.text) if self.console else None
        if self.status:
            self.status.__enter__()
        else:
            print(self.text, flush=True)
        return self

    def __exit__(self, *exc):
        if self.status:
            self.status.__exit__(*exc)
        if exc[0] is None:
            logger.info("%s: %.1f s", self.text, time.perf_counter() - self.t0)


def load_model(spec: str):
    """``smollm2`` (the embedded default), ``r1`` (random reference Llama) or a folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import models

    if spec == "smollm2":
        return models.load_smollm2()
    if spec == "r1":
        return models.r1_model(), None
    model = AutoModelForCausalLM.from_pretrained(spec, dtype="float32").eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def encode_prompt(tokenizer, prompt: str):
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(3, 32000, (1, 128), generator=g)}
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    return dict(tokenizer(prompt, return_tensors="pt"))


class _prefix_cache:
    """Prefix-cache reuse on or off for the duration of a block (the paged KV manager's switch)."""

    def __init__(self, fast, on: bool):
        self.runner, self.on = fast.runner.kv, on

    def __enter__(self):
        self.prev = getattr(self.runner, "prefix_cache", None)
        if self.prev is not None:
            self.runner.prefix_cache = self.on

    def __exit__(self, *exc):
        if self.prev is not None:
            self.runner.prefix_cache = self.prev


def cached_prefix_ttft(fast, inputs: dict, repeats: int):
    """TTFT of the prompt again once its full KV blocks are in the prefix cache.

    Returns (median TTFT in s, prompt tokens reused) or (None, why not). The first call
    registers the prompt's blocks, the second is the first hit (untimed, as a warm-up), then
    ``repeats`` timed calls.
    """
    from .timing import timed_generate

    runner = fast.runner.kv
    prompt_len = inputs["input_ids"].shape[1]
    if getattr(runner, "prefix_cache", None) is None:
        return None, "the model runs without the paged cache, so without a prefix cache"
    block = runner.block_size
    if prompt_len <= block:
        return None, f"the prompt ({prompt_len} tokens) does not fill one {block}-token block plus a token to compute"
    one = dict(inputs, max_new_tokens=1, do_sample=False)
    ttfts = []
    with torch.no_grad(), _prefix_cache(fast, True):
        fast.generate(**one)
        fast.generate(**one)
        for _ in range(repeats):
            _, timer = timed_generate(fast, **one)
            ttfts.append(timer.ttft_s)
        reused = fast.last_timings.reused_tokens[0]
    return statistics.median(ttfts), reused


def cmd_run(args) -> int:
    """The demo: optimize the model, generate, compare cold TTFT/TPOT with HF eager.

    Cold against cold: HF eager computes the whole prompt every round, so pdcompile's
    timed rounds run with prefix-cache reuse off (checked on every round). What the prefix
    cache does for a repeated prompt is measured after, on its own labelled line.
    """
    from . import optimize
    from .timing import timed_generate

    console = _console()
    with _progress(console, f"loading model {args.model}"):
        model, tokenizer = load_model(args.model)
    inputs = encode_prompt(tokenizer, args.prompt)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    with _progress(console, f"pdcompile.optimize (backend={args.backend or 'default'})"), _held_output(args.verbose):
        fast = optimize(model, backend=args.backend, prefix_cache=not args.no_prefix_cache,
                        prefill_dtype=args.prefill_dtype)

    ours = f"pdcompile ({fast.backend})"
    results = {"HF eager": [], ours: []}
    outputs = {}
    with _progress(console, f"generating {args.max_new_tokens} tokens, {args.repeats} rounds, interleaved, cold"):
        with torch.no_grad(), _prefix_cache(fast, False):
            model.generate(**inputs, **gen)  # warm-up both
            fast.generate(**inputs, **gen)
            for _ in range(args.repeats):
                for name, m in (("HF eager", model), (ours, fast)):
                    out, timer = timed_generate(m, **inputs, **gen)
                    if m is fast and any(fast.last_timings.reused_tokens):
                        raise RuntimeError("a timed round reused cached prompt blocks: the comparison would not be cold")
                    results[name].append((timer.ttft_s, timer.tpot_s))
                    outputs[name] = out
    cached = (None, "--no-prefix-cache")
    if not args.no_prefix_cache:
        with _progress(console, "prefix cache: the same prompt with its blocks cached"), _held_output(args.verbose):
            cached = cached_prefix_ttft(fast, inputs, args.repeats)

    prompt_len = inputs["input_ids"].shape[1]
    texts = {
        name: (tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True) if tokenizer else out[0, prompt_len:].tolist())
        for name, out in outputs.items()
    }
    same = torch.equal(*outputs.values())
    rows = []
    for name, vals in results.items():
        ttft = statistics.median(v[0] for v in vals) * 1e3
        tpot = statistics.median(v[1] for v in vals) * 1e3
        rows.append((name, ttft, tpot))
    base_ttft, base_tpot = rows[0][1], rows[0][2]

    print()
    print(f"Prompt: {args.prompt!r} ({prompt_len} tokens)")
    print(f"pdcompile output ({args.max_new_tokens} tokens, greedy):\n{texts[ours]}\n")
    print(f"Tokens identical to HF eager: {same}")
    title = (f"{args.model}: cold prompts (no prefix-cache reuse), median of {args.repeats} interleaved runs, "
             f"{torch.get_num_threads()} threads")
    if console:
        from rich.table import Table

        table = Table(title=title)
        for col in ("system", "TTFT ms", "TPOT ms/token", "TTFT speed-up", "TPOT speed-up"):
            table.add_column(col, justify="right" if col != "system" else "left")
        for name, ttft, tpot in rows:
            table.add_row(name, f"{ttft:.1f}", f"{tpot:.2f}", f"{base_ttft / ttft:.2f}x", f"{base_tpot / tpot:.2f}x")
        console.print(table)
    else:
        print(title)
        for name, ttft, tpot in rows:
            print(f"{name:28s} TTFT {ttft:8.1f} ms  TPOT {tpot:7.2f} ms/token  ({base_tpot / tpot:.2f}x)")
    ttft, detail = cached
    if ttft is None:
        print(f"Cached-prefix TTFT: not measured ({detail}).")
    else:
        print(f"Cached-prefix TTFT (separate from the cold comparison): {ours} with the first {detail} of the "
              f"{prompt_len} prompt tokens in its prefix cache: {ttft * 1e3:.1f} ms (cold: {rows[1][1]:.1f} ms).")
    return 0 if same else 1


def print_report(report, console) -> None:
    if console is None:
        print(report)
        return
    from rich.table import Table

    table = Table(title=f"pdcompile passes (cost at batch {report.shape['batch']}, prompt {report.shape['prompt']}, "
                        f"cache {report.shape['capacity']})")
    for col in ("phase", "pass", "status", "matches", "nodes", "FLOPs", "bytes", "s", "detail"):
        table.add_column(col, overflow="fold")
    for r in report.rows():
        table.add_row(r["phase"], r["pass"], r["status"], str(r["matches"]), r["nodes"], r["flops"], r["bytes"],
                      r["seconds"], r["detail"])
    console.print(table)
    for line in report.summary():
        console.print(line)


def cmd_inspect(args) -> int:
    """Capture + passes (no compilation); print what each pass did; optionally dump graphs."""
    import json
    import os

    from .api import _resolve_config, transform
    from .config import CacheConfig, OptimizeConfig, PassConfig, QuantConfig

    if args.dump:
        os.environ["PDCOMPILE_DUMP_DIR"] = args.dump
    console = _console()
    with _progress(console, f"loading model {args.model}"):
        model, _ = load_model(args.model)
    config = OptimizeConfig(backend="eager", cache=CacheConfig(max_seq_len=args.max_seq_len),
                            passes=PassConfig(disabled=frozenset(args.disable)), quant=QuantConfig.parse(args.weights))
    if args.check and config.quant is None:
        raise SystemExit("--check compares a quantized graph with fp32: pass --weights int8 or int4")
    config, seq_len = _resolve_config(model, config, None, None, None, None)
    with _progress(console, "capture + passes"):
        _, graphs, report, _ = transform(model, config, seq_len, {})
    report.backend = "-"
    print_report(report, console)
    if args.check:
        from .quant_check import layer_errors

        g = graphs["prefill"]
        rows = layer_errors(g.gm, g.ctx.signature, model.config.vocab_size)
        print(f"per-layer relative output error, prefill graph, {args.weights} vs fp32 weights "
              "(same input: the quantized graph's activation, 32 random tokens)")
        for r in rows:
            print(f"  {r['layer']:60s} {r['out_features']:7d}  {r['rel_error']:.2e}")
        if rows:
            errs = [r["rel_error"] for r in rows]
            print(f"  {len(rows)} layers: mean {sum(errs) / len(errs):.2e}, max {max(errs):.2e}")
    if args.dump:
        print(f"graphs before/after every pass: {args.dump}/<phase>/")
    if args.json:
        out = report.to_dict()
        if args.check:
            out["layer_errors"] = rows
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return 0


def cmd_export(args) -> int:
    """Optimize a model and write it as a bundle of engines."""
    from . import export, optimize

    console = _console()
    with _progress(console, f"loading model {args.model}"):
        model, tokenizer = load_model(args.model)
    with _progress(console, "capture + passes"):
        # The in-process backend is irrelevant here: eager skips a compile the bundle redoes.
        fast = optimize(model, backend="eager", max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len)
    with _progress(console, f"lowering to {args.backend} and writing {args.out}"), _held_output(args.verbose):
        path = export(fast, args.out, backend=args.backend, tokenizer=tokenizer, overwrite=args.overwrite,
                      sign=args.sign)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote {path} ({size / 1e6:.1f} MB){', signed' if args.sign else ''}; "
          f"load it with pdcompile.load({str(path)!r})")
    return 0


def cmd_generate(args) -> int:
    """Load a bundle (no HF model) and generate from a prompt with its tokenizer."""
    from transformers import AutoTokenizer

    from . import load

    console = _console()
    with _progress(console, f"loading bundle {args.bundle}"):
        # load() checks every hash first, so the tokenizer files read below are the exported ones
        model = load(args.bundle, trust_native_code=args.trust_native_code, public_key=args.public_key)
        tokenizer = AutoTokenizer.from_pretrained(args.bundle)
    inputs = encode_prompt(tokenizer, args.prompt)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def cmd_verify(args) -> int:
    """Check a bundle as load() does, without opening (or running) its engines."""
    from .bundle import check, native_code

    manifest = check(args.bundle, public_key=args.public_key)
    native = native_code(manifest["backend"])
    print(f"{args.bundle}: {len(manifest['files'])} files match their sha256; backend {manifest['backend']}; "
          f"signature {'verified' if args.public_key else 'not checked (no --public-key)'}; "
          f"native code: {'yes, loading needs --trust-native-code' if native else 'no'}")
    return 0


def cmd_bench(args) -> int:
    """TTFT / TPOT / throughput of pdcompile and the peers, with the physical floor."""
    from . import bench

    console = _console()
    spec = "r1" if args.preset == "r1" else args.model
    with _progress(console, f"loading model {spec}"):
        model, tokenizer = load_model(spec)
    if args.serve:
        return _bench_serve(args, spec, model)
    cfg = bench.BenchConfig(
        model=spec, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
        backends=tuple(args.backends), peers=tuple(args.peers), passes_off=not args.no_passes_off,
        sweep_prompts=tuple(args.sweep) if args.sweep else (),
        position_tokens=args.position_tokens, contiguous=not args.no_contiguous,
        kv_experiments=not args.no_kv_experiments, prefix_len=args.prefix_len,
        max_seq_len=min(args.max_seq_len, _model_limit(model)), batches=tuple(args.batches),
        weights=tuple(args.weights), ignore_eos=args.ignore_eos, reprepare=not args.no_reprepare,
        bf16_prefill=args.bf16_prefill,
    )
    if not args.keep_compile_cache and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        # "cold" capture+compile means an empty inductor cache (for pdcompile and for HF's
        # torch.compile peer alike); the warm re-prepare then finds this run's entries
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="pdcompile-bench-inductor-")
    if not args.keep_compile_cache and "PDCOMPILE_CACHE_DIR" not in os.environ:
        # and an empty pdcompile compile cache, which the cached (new process) and warm
        # prepares then read
        import tempfile

        os.environ["PDCOMPILE_CACHE_DIR"] = tempfile.mkdtemp(prefix="pdcompile-bench-cache-")
    data = bench.run(model, cfg, progress=lambda m: logger.info(m), tokenizer=tokenizer)
    return _write_results(bench, data, args.json or f"bench-{spec.replace('/', '_')}.json", args.plot)


def _write_results(module, data: dict, out: str, plot: str | None) -> int:
    """Save a benchmark's JSON, print its tables and draw its plots (bench and serve_bench alike)."""
    module.save_json(data, out)
    print(module.markdown_table(data))
    print(f"\nresults: {out}")
    if plot:
        module.plot(data, plot)
        print(f"plots: {plot}")
    return 0


def cmd_serve(args) -> int:
    """Serve a model folder (or smollm2 / r1) or a bundle over an OpenAI-compatible HTTP API."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from . import load, optimize
    from .engine import Engine
    from .serve import serve

    console = _console()
    path = Path(args.model)
    if (path / "manifest.json").is_file():
        with _progress(console, f"loading bundle {args.model}"):
            model = load(path, trust_native_code=args.trust_native_code, public_key=args.public_key)
            try:
                tokenizer = AutoTokenizer.from_pretrained(path)
            except (OSError, ValueError):
                tokenizer = None
    else:
        with _progress(console, f"loading model {args.model}"):
            hf, tokenizer = load_model(args.model)
        with _progress(console, "optimize"), _held_output(args.verbose):
            model = optimize(hf, backend=args.backend, max_batch_size=args.max_batch_size,
                             max_seq_len=args.max_seq_len, prefill_dtype=args.prefill_dtype)
    engine = Engine(model, tokenizer=tokenizer, max_num_seqs=args.max_num_seqs,
                    max_prefill_tokens=args.max_prefill_tokens, max_queue=args.max_queue)
    if engine.can_extend:  # chunked prefill and the prefix cache need it: build it before the first request
        with _progress(console, "building the extend graph"), _held_output(args.verbose):
            engine.prepare()
    name = args.served_model_name or (path.name if path.exists() else args.model)
    print(f"serving {name} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    serve(engine, name, args.host, args.port, shutdown_timeout=args.shutdown_timeout)
    return 0


def _bench_serve(args, spec, model) -> int:
    from . import serve_bench

    systems = args.systems or [s for s in serve_bench.SYSTEMS if s != "transformers-serve" or spec != "r1"]
    cfg = serve_bench.LoadConfig(model=spec, rates=tuple(args.rates), num_requests=args.num_requests, seed=args.seed,
                                 systems=tuple(systems), backend=args.backend,
                                 max_batch_size=args.max_batch_size, max_prefill_tokens=args.max_prefill_tokens)
    data = serve_bench.run(model, cfg, progress=lambda m: logger.info(m))
    return _write_results(serve_bench, data, args.json or f"bench-serve-{spec.replace('/', '_')}.json", args.plot)


def _model_limit(model) -> int:
    from .api import default_max_seq_len

    return default_max_seq_len(model.config)


def cmd_cache(args) -> int:
    from .compile_cache import CompileCache, describe

    store = CompileCache(args.dir)
    if args.action == "clear":
        n = store.clear()
        print(f"removed {n} entr{'y' if n == 1 else 'ies'} from {store.root}")
        return 0
    entries = store.entries()
    print(f"{store.root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
          f"{sum(e.bytes for e in entries) / 1e6:.1f} MB of {store.limit / 1e6:.0f} MB (PDCOMPILE_CACHE_SIZE)")
    if entries:
        print(f"{'key':16s}  {'size':>12s}  {'last used':16s}  {'backend':12s} model")
        for line in reversed(describe(entries)):  # most recently used first
            print(line)
    return 0


def _weights(text: str) -> str:
    """--weights: checked here (argparse names the bad value), passed on as the string."""
    from .config import QuantConfig

    try:
        if QuantConfig.parse(text) is None:
            raise ValueError("fp32 is the unquantized default: leave --weights out")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _prefill_dtype_arg(p) -> None:
    p.add_argument("--prefill-dtype", choices=PREFILL_DTYPES, default="float32",
                   help="dtype of prefill's linear layers; bfloat16 is several times faster on CPUs with "
                        "AVX-512 BF16 or AMX (ignored, with a warning, elsewhere)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pdcompile", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="optimize a model, generate, compare TTFT/TPOT with HF eager")
    p.add_argument("--model", default="smollm2", help="smollm2 (default), r1, or a model folder")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--backend", default=None, help="eager | inductor | onnxruntime | tensorrt (default: per device)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="prefix caching off: no extend graph to build, no cached-prefix TTFT line")
    _prefill_dtype_arg(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("inspect", help="show what each graph pass does to a model (no compilation)")
    p.add_argument("model", nargs="?", default="smollm2", help="smollm2 (default), r1, or a model folder")
    p.add_argument("--dump", metavar="DIR", help="write every graph before/after each pass under DIR")
    p.add_argument("--disable", nargs="*", default=[], metavar="PASS", help="passes to switch off")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--weights", type=_weights, metavar="int8|int4[:field=value,...]",
                   help="quantize the weights (the quantize_weights pass); e.g. int4:narrowing_bits=4")
    p.add_argument("--check", action="store_true",
                   help="with --weights: each quantized layer's output error against its fp32 weight")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("export", help="optimize a model and write its engines as a bundle")
    p.add_argument("model", help="smollm2, r1, or a model folder")
    p.add_argument("out", help="bundle folder to write")
    p.add_argument("--backend", default="onnxruntime", help="onnxruntime (default) | inductor | tensorrt")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a pdcompile bundle")
    p.add_argument("--sign", metavar="KEYFILE", help="sign the bundle with this ed25519 private key (PEM)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("generate", help="load a bundle and generate from a prompt")
    p.add_argument("bundle", help="bundle folder written by export")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--trust-native-code", action="store_true",
                   help="allow bundles whose engines are native code (inductor, tensorrt), which runs in this process")
    p.add_argument("--public-key", metavar="KEYFILE", help="require a signature that verifies with this ed25519 key")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("verify", help="check a bundle's manifest, hashes and signature without loading it")
    p.add_argument("bundle")
    p.add_argument("--public-key", metavar="KEYFILE", help="require a signature that verifies with this ed25519 key")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("bench", help="TTFT/TPOT/throughput against HF and the physical floor")
    p.add_argument("--model", default="smollm2", help="smollm2 (default) or a model folder")
    p.add_argument("--preset", choices=["r1"], help="r1: the reference random Llama (55M params, fp32)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", nargs="*", default=["onnxruntime", "inductor", "eager"])
    p.add_argument("--peers", nargs="*", default=["hf-eager", "hf-static-compile", "exporters-onnx"],
                   help="hf-eager, hf-static-compile, exporters-onnx, and the CPU engines (pip install "
                        "'pdcompile[peers]'): llama-cpp, ort-genai, openvino-genai, each as ENGINE (all its "
                        "variants) or ENGINE:VARIANT (llama-cpp:f32|q8_0|q4_0, ort-genai:fp32|int4, "
                        "openvino-genai:fp32|fp32-default|int8|int4)")
    p.add_argument("--weights", nargs="*", default=[], type=_weights, metavar="int8|int4[:field=value,...]",
                   help="also measure the default backend with these quantized weights")
    p.add_argument("--bf16-prefill", action="store_true",
                   help="also measure the default backend (fp32 and each --weights) with prefill_dtype=bfloat16")
    p.add_argument("--ignore-eos", action="store_true",
                   help="every system generates --new-tokens tokens (EOS does not stop it), as the engines compare")
    p.add_argument("--no-reprepare", action="store_true",
                   help="skip preparing pdcompile again (new process with the compile cache, and warm)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes for throughput")
    p.add_argument("--no-passes-off", action="store_true", help="skip the passes-off variant")
    p.add_argument("--no-contiguous", action="store_true", help="skip the contiguous-KV variant")
    p.add_argument("--no-kv-experiments", action="store_true",
                   help="skip paged-vs-contiguous KV memory and the cached-prefix TTFT")
    p.add_argument("--keep-compile-cache", action="store_true",
                   help="use the existing inductor and pdcompile compile caches (default: fresh ones, so 'cold' "
                        "is cold)")
    p.add_argument("--prefix-len", type=int, default=512, help="shared prefix for the prefix-cache TTFT")
    p.add_argument("--sweep", nargs="*", type=int, default=[32, 64, 128, 256, 512, 1024, 2048],
                   help="prompt lengths for the TTFT plot (none: skip)")
    p.add_argument("--position-tokens", type=int, default=256, help="tokens generated for the TPOT-by-position plot")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="PNG")
    g = p.add_argument_group("serving under load (--serve; see pdcompile/serve_bench.py)")
    g.add_argument("--serve", action="store_true",
                   help="Poisson-arrival load on the engine, transformers' continuous batching, static generate()")
    g.add_argument("--rates", nargs="*", type=float, default=[0.25, 0.5, 1.0, 2.0, 4.0], help="requests/s")
    g.add_argument("--num-requests", type=int, default=64, help="requests per rate")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--systems", nargs="*", default=None,
                   help="default: pdcompile-engine hf-continuous-batching pdcompile-static, and transformers-serve "
                        "(HTTP) when the model is a folder with a tokenizer (smollm2 or a path)")
    g.add_argument("--backend", default=None, help="pdcompile's backend for --serve (default: per device)")
    g.add_argument("--max-batch-size", type=int, default=8)
    g.add_argument("--max-prefill-tokens", type=int, default=256)
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("serve", help="serve a model or bundle over an OpenAI-compatible HTTP API")
    p.add_argument("model", help="smollm2, r1, a model folder, or a bundle folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default=None, help="eager | inductor | onnxruntime (default: per device)")
    p.add_argument("--max-batch-size", type=int, default=8, help="the graphs' batch, and the most requests running")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None, help="most requests running at once")
    p.add_argument("--max-prefill-tokens", type=int, default=256, help="prompt tokens computed per step (chunk budget)")
    p.add_argument("--max-queue", type=int, default=256, help="most requests waiting; more get HTTP 503")
    p.add_argument("--served-model-name", default=None)
    _prefill_dtype_arg(p)
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds requests in flight get to finish on SIGTERM/SIGINT before they are aborted")
    p.add_argument("--trust-native-code", action="store_true", help="bundles: allow AOTInductor/TensorRT engines")
    p.add_argument("--public-key", metavar="KEYFILE", help="bundles: require a signature verified by this key")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("cache", help="the persistent compile cache: list or clear its entries")
    p.add_argument("action", choices=["ls", "clear"])
    p.add_argument("--dir", default=None, help="cache folder (default: $PDCOMPILE_CACHE_DIR or ~/.cache/pdcompile)")
    p.set_defaults(fn=cmd_cache)

    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from .bundle import BundleError
    from .capture import UnsupportedModelError

    try:
        return args.fn(args)
    except BundleError as e:  # the message says what is wrong with the bundle; a traceback adds nothing
        print(f"pdcompile {args.cmd}: {e}", file=sys.stderr)
        return 2
    except UnsupportedModelError as e:
        if args.verbose:
            raise  # with torch's report chained
        print(f"pdcompile: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
