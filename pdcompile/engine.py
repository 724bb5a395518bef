"""The engine: continuous batching with chunked prefill over the paged KV pool.

Requests arrive and leave at any step. A request is a list of known tokens (prompt, then
output) of which the first ``computed`` have their keys and values in the pool; there are
no separate prefill and decode states (vLLM v1's scheduler works the same way). Each
:meth:`Engine.step`:

1. takes the requests other threads submitted (cancels act at once, under the lock);
2. schedules. Every running request gets its next tokens: one for a request that is
   decoding, a chunk of what is left of its prompt for one still prefilling, the chunks
   drawn from a token budget (``max_prefill_tokens``) that decodes do not spend. Then
   waiting requests are admitted first come, first served, while the budget, ``max_num_seqs``
   and the pool allow; a prompt whose first full blocks are in the prefix cache starts after
   them. Blocks are allocated here; when the pool runs out the most recently admitted
   request is preempted: its blocks are freed and it waits again, to be recomputed from its
   prompt and output (which finds its own blocks in the prefix cache if they are still there);
3. runs at most two graph calls: *decode* for every row feeding one token (per-row
   positions), *extend* (or *prefill* when every chunk starts at position 0) for the
   chunks, right-padded;
4. samples a token for each row that has now computed all its known tokens, checks the
   stop conditions and streams the outputs.

Requests are fed from any thread (:meth:`Engine.submit`); one loop steps, either the
engine's own thread (:meth:`Engine.start`) or whoever iterates a stream when no thread runs.
A step holds the runner's lock, so ``generate()`` calls on the same model run between steps.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import operator
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers.generation import logits_process as lp

from .kv_cache import CapacityError
from .kv_pool import block_hashes
from .phase import Role

logger = logging.getLogger(__name__)


class EngineFull(RuntimeError):
    """The request queue is full (``max_queue`` waiting requests); try again later."""


class EngineStopped(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation parameters.

    ``temperature=0`` is greedy decoding (argmax, as ``generate(do_sample=False)``);
    otherwise tokens are sampled after temperature, top-k (0: off) and top-p (1: off), from
    the request's own generator (``seed``: reproducible). Generation stops at ``max_tokens``,
    at the model's eos tokens (unless ``ignore_eos``), at any of ``stop_token_ids``, or when
    the text contains one of ``stop`` (needs the engine's tokenizer; the text is cut before it).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # record the log-probability of each chosen token

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        checks = [
            (type(self.max_tokens) is int and self.max_tokens >= 1, "max_tokens", "an int >= 1"),
            (isinstance(self.temperature, (int, float)) and self.temperature >= 0, "temperature", "a number >= 0"),
            (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]"),
            (type(self.top_k) is int and self.top_k >= 0, "top_k", "an int >= 0 (0: off)"),
            (self.seed is None or type(self.seed) is int, "seed", "an int or None"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings"),
            (all(type(t) is int for t in self.stop_token_ids), "stop_token_ids", "ints"),
        ]
        for ok, name, what in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {what}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RequestOutput:
    """What a stream yields: the tokens (and text) new since the last output."""

    request_id: str
    token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort" (cancelled, shut down), "error"
    logprobs: list[float] | None = None
    metrics: dict | None = None  # on the last output: arrival, scheduled, first_token, finished (perf_counter s), ...


@dataclass
class Completion:
    """A finished request, all outputs joined."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float]
    metrics: dict


class _Request:
    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, sink):
        self.id, self.prompt, self.params, self.sink = request_id, prompt, params, sink
        self.tokens = list(prompt)  # known tokens: prompt, then output
        self.computed = 0  # tokens whose KV is in the pool
        self.blocks: list[list[int]] = []  # per KV group (PagedKV.groups); 0: a block outside a sliding window
        self.registered = 0  # full blocks made findable in the prefix cache
        self.status = "waiting"
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        self.text, self.sent = "", 0  # decoded output text; characters already streamed
        self.logprobs: list[float] = []
        self.sent_tokens = 0
        self.metrics = {"arrival": time.perf_counter(), "scheduled": None, "first_token": None, "finished": None,
                        "prompt_tokens": len(prompt), "cached_tokens": 0, "preemptions": 0}

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt):]


class Stream:
    """A request's outputs as a sync iterator; ``result()`` waits for the whole completion.

    Without a running engine thread, iterating drives the engine (calls ``step()``).
    """

    def __init__(self, engine: "Engine", request_id: str, prompt: list[int]):
        self.engine, self.request_id, self.prompt = engine, request_id, prompt
        self._queue: queue.Queue = queue.Queue()
        self._done = False

    def _push(self, out: RequestOutput) -> None:
        self._queue.put(out)

    def __iter__(self):
        return self

    def __next__(self) -> RequestOutput:
        if self._done:
            raise StopIteration
        while True:
            try:
                out = self._queue.get(timeout=0.05) if self.engine.running_thread else self._queue.get_nowait()
                break
            except queue.Empty:
                if not self.engine.running_thread and not self.engine.step():
                    time.sleep(0.001)  # nothing could run (the pool may be held by a generate() call)
        self._done = out.finished
        return out

    def cancel(self) -> None:
        self.engine.cancel(self.request_id)

    def result(self) -> Completion:
        return _join(self.request_id, self.prompt, list(self))


class AsyncStream:
    """A request's outputs as an async iterator (needs the engine's thread: ``Engine.start()``)."""

    def __init__(self, engine: "Engine", request_id: str, prompt: list[int], loop: asyncio.AbstractEventLoop):
        self.engine, self.request_id, self.prompt, self._loop = engine, request_id, prompt, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._done = False

    def _push(self, out: RequestOutput) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        out = await self._queue.get()
        self._done = out.finished
        return out

    async def cancel(self) -> None:
        await asyncio.to_thread(self.engine.cancel, self.request_id)

    async def result(self) -> Completion:
        return _join(self.request_id, self.prompt, [out async for out in self])


def _join(request_id, prompt, outs: list[RequestOutput]) -> Completion:
    last = outs[-1]
    return Completion(request_id, prompt, [t for o in outs for t in o.token_ids], "".join(o.text for o in outs),
                      last.finish_reason, [p for o in outs for p in (o.logprobs or [])], last.metrics or {})


class Engine:
    """Continuous batching over an :class:`~pdcompile.OptimizedModel` (or a bundle path).

    Args:
        model: an OptimizedModel with the paged KV cache, or a bundle folder (loaded with
            :func:`pdcompile.load`; bundles carry no extend graph, so prompts are prefilled
            whole and the prefix cache is off).
        tokenizer: for output text and stop strings (optional).
        max_num_seqs: most requests running at once (default and limit: the model's
            ``max_batch_size``, the batch its graphs take).
        max_prefill_tokens: prompt tokens computed per step (the chunk budget); decodes are
            not counted.
        max_queue: most requests waiting; one more raises :class:`EngineFull`.
    """

    def __init__(self, model, *, tokenizer=None, max_num_seqs: int | None = None, max_prefill_tokens: int = 256,
                 max_queue: int = 1024):
        if isinstance(model, (str, os.PathLike)):
            from .bundle import load

            model = load(model)
        self.model, self.tokenizer = model, tokenizer
        runner = model.runner
        if not runner.paged:
            raise ValueError("the engine needs the paged KV cache: optimize the model with paged=True "
                             "(models whose attention cannot be paged, e.g. Gemma 2, are not served by the engine)")
        self.runner, self.kv, self.pool = runner, runner.kv, runner.kv.pool
        # Every KV group (full attention, each sliding window) gets a block per block of the
        # sequence; sliding groups are not trimmed to their window here (generate() does that).
        self.groups = [g.pool for g in runner.kv.groups]
        self.block_size = self.kv.block_size
        self.max_num_seqs = max_num_seqs or runner.max_batch_size
        if not 1 <= self.max_num_seqs <= runner.max_batch_size:
            raise ValueError(f"max_num_seqs={max_num_seqs} must be in [1, max_batch_size={runner.max_batch_size}] "
                             "(the batch the graphs were compiled for)")
        if type(max_prefill_tokens) is not int or max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be an int >= 1, got {max_prefill_tokens!r}")
        self.max_prefill_tokens, self.max_queue = max_prefill_tokens, max_queue
        executor = runner.executor
        self.can_extend = "extend" in executor.phases or "extend" in executor.lazy
        self.prefix_cache = self.kv.prefix_cache and self.can_extend
        eos = model.generation_config.eos_token_id
        self.eos = set() if eos is None else set(torch.as_tensor(eos).reshape(-1).tolist())
        self.lock = runner.lock  # one step (or generate() call) at a time on the shared pool
        self._incoming: collections.deque[_Request] = collections.deque()
        self._requests: dict[str, _Request] = {}  # submitted, not yet finished
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: list[_Request] = []  # in admission order: the last is preempted first
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stop = False
        self.counters = collections.Counter()  # steps, prefix_query_tokens, prefix_hit_tokens, preemptions, ...

    def prepare(self) -> None:
        """Build the extend graph now (one-time) rather than on the first chunked or cached prompt."""
        if self.can_extend:
            with self.lock:
                self.runner.executor.phase("extend")

    # ------------------------------------------------------------------ submitting
    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> Stream:
        """Queue ``prompt`` (token ids); returns its output stream. Thread-safe."""
        prompt = self._check(prompt, params or SamplingParams())
        stream = Stream(self, request_id or self._new_id(), prompt)
        self._enqueue(_Request(stream.request_id, prompt, params or SamplingParams(), stream._push))
        return stream

    def submit_async(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> AsyncStream:
        """As :meth:`submit`, from a coroutine: an async iterator over the outputs."""
        if not self.running_thread:
            raise RuntimeError("submit_async needs the engine's step loop running: call engine.start() first")
        prompt = self._check(prompt, params or SamplingParams())
        stream = AsyncStream(self, request_id or self._new_id(), prompt, asyncio.get_running_loop())
        self._enqueue(_Request(stream.request_id, prompt, params or SamplingParams(), stream._push))
        return stream

    def _new_id(self) -> str:
        return f"req_{next(self._ids)}"

    def _check(self, prompt, params: SamplingParams) -> list[int]:
        if isinstance(prompt, torch.Tensor) or type(prompt).__module__ == "numpy":
            prompt = prompt.reshape(-1).tolist()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        try:  # ints, numpy integers; not floats, bools or strings
            if not isinstance(prompt, (list, tuple)) or any(isinstance(t, bool) for t in prompt):
                raise TypeError
            prompt = [operator.index(t) for t in prompt]
        except TypeError:
            raise TypeError("prompt must be a list of token ids (ints)") from None
        if not prompt:
            raise ValueError("empty prompt: every prompt needs at least one token")
        vocab = self.runner.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab - 1}]")
        total = len(prompt) + params.max_tokens
        if total > self.runner.max_seq_len:
            raise CapacityError(f"prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} = {total} tokens "
                                f"exceeds max_seq_len={self.runner.max_seq_len}")
        blocks = -(-total // self.block_size)
        if blocks > self.pool.num_blocks - 1:
            raise CapacityError(f"a request of {total} tokens needs {blocks} KV blocks; the pool has "
                                f"{self.pool.num_blocks - 1}: pass a larger kv_cache_memory= to pdcompile.optimize()")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer: Engine(model, tokenizer=...)")
        return list(prompt)

    def _enqueue(self, req: _Request) -> None:
        if not self._accepting:
            raise EngineStopped("the engine is shutting down and takes no new requests")
        if len(self._incoming) + len(self.waiting) >= self.max_queue:
            raise EngineFull(f"the request queue is full ({self.max_queue} waiting); retry later")
        if req.id in self._requests:
            raise ValueError(f"request id {req.id!r} is already in use")
        self._requests[req.id] = req
        self._incoming.append(req)
        self._wake.set()

    def cancel(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks now (waits for a step in flight). False if unknown or done."""
        with self.lock:
            req = self._requests.get(request_id)
            if req is None:
                return False
            self._finish(req, "abort")
            return True

    # ------------------------------------------------------------------ the step loop
    @property
    def running_thread(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def has_work(self) -> bool:
        return bool(self._incoming or self.waiting or self.running)

    def start(self) -> "Engine":
        """Run the step loop in a background thread."""
        if not self.running_thread:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="pdcompile-engine", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop:
            if not self.has_work():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception:  # never leave streams hanging: fail what is in flight, keep serving
                logger.exception("engine step failed outside the graph call")
                with self.lock:
                    for req in list(self.running):
                        self._finish(req, "error", error="internal error in the engine step")

    def shutdown(self, *, cancel: bool = False, timeout: float | None = None) -> None:
        """Take no new requests; finish (or, with ``cancel``, abort) the others; stop the thread.

        Every request ends with a final output either way ("abort" when cancelled or past
        ``timeout`` seconds): nothing is dropped silently.
        """
        self._accepting = False
        deadline = None if timeout is None else time.monotonic() + timeout
        if not cancel:
            while self.has_work() and (deadline is None or time.monotonic() < deadline):
                if self.running_thread or not self.step():
                    time.sleep(0.01)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self.lock:
            for req in list(self._requests.values()):
                self._finish(req, "abort")

    def step(self) -> int:
        """One iteration: schedule, run the graphs, sample, stream. Returns the rows run."""
        with self.lock:
            while self._incoming:
                req = self._incoming.popleft()
                if req.status == "waiting":  # not cancelled in the meantime
                    self.waiting.append(req)
            work = self._schedule()
            if not work:
                return 0
            self.counters["steps"] += 1
            try:
                logits = self._run(work)
            except Exception as e:
                logger.exception("engine step failed; failing its %d requests", len(work))
                for req, _ in work:
                    self._finish(req, "error", error=f"{type(e).__name__}: {e}")
                return 0
            self._advance(work, logits)
            return len(work)

    # ------------------------------------------------------------------ scheduling
    def _schedule(self) -> list[tuple[_Request, int]]:
        """[(request, tokens to compute this step)]; blocks for them allocated."""
        budget = self.max_prefill_tokens
        work: list[tuple[_Request, int]] = []
        for req in list(self.running):
            if req.status != "running":  # preempted by an earlier row of this loop
                continue
            n = self._chunk(req, budget)
            if n == 0:
                continue
            if not self._reserve_or_preempt(req, req.computed + n, work):
                continue
            work.append((req, n))
            budget -= n if n > 1 else 0
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            req = self.waiting[0]
            if req.computed == 0 and not any(req.blocks) and self.prefix_cache:
                self._lookup_prefix(req)
            n = self._chunk(req, budget)
            if n == 0 or not self._reserve(req, req.computed + n):
                self._free(req)  # not admitted: give back the prefix blocks it took
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            req.status = "running"
            self.counters["prefix_query_tokens"] += len(req.tokens)
            self.counters["prefix_hit_tokens"] += req.computed
            req.metrics["cached_tokens"] = max(req.metrics["cached_tokens"], req.computed)
            if req.metrics["scheduled"] is None:
                req.metrics["scheduled"] = time.perf_counter()
            self.running.append(req)
            work.append((req, n))
            budget -= n if n > 1 else 0
        return work

    def _chunk(self, req: _Request, budget: int) -> int:
        left = len(req.tokens) - req.computed
        if left == 1:
            return 1  # a decode step: not counted against the prefill budget
        if not self.can_extend:  # prefill graph only: the whole prompt from position 0, in one call
            return left if left <= budget or budget == self.max_prefill_tokens else 0
        return min(left, budget)

    def _lookup_prefix(self, req: _Request) -> None:
        # keep at least one token to compute: it yields the logits of the next token
        hashes = block_hashes(req.tokens, self.block_size, len(req.tokens) - 1)
        req.blocks = self.kv.lookup_prefix(hashes)
        req.registered = len(req.blocks[0])
        req.computed = req.registered * self.block_size

    def _reserve(self, req: _Request, upto: int) -> bool:
        if not req.blocks:
            req.blocks = [[] for _ in self.groups]
        want = -(-upto // self.block_size)
        if any(want - len(blocks) > pool.available() for pool, blocks in zip(self.groups, req.blocks)):
            return False
        for pool, blocks in zip(self.groups, req.blocks):
            if want > len(blocks):
                blocks.extend(pool.allocate(want - len(blocks)))
        return True

    def _reserve_or_preempt(self, req: _Request, upto: int, work: list) -> bool:
        """Blocks for ``req`` up to ``upto``, preempting the newest running requests; False if ``req`` itself went."""
        while not self._reserve(req, upto):
            victim = self.running[-1]
            self._preempt(victim)
            for i, (r, _) in enumerate(work):
                if r is victim:
                    del work[i]
                    break
            if victim is req:
                return False
        return True

    def _preempt(self, req: _Request) -> None:
        """Free the request's blocks; it waits at the head of the queue and is recomputed."""
        logger.debug("preempting %s (%d tokens computed)", req.id, req.computed)
        self.running.remove(req)
        self._free(req)
        req.status = "waiting"
        req.metrics["preemptions"] += 1
        self.counters["preemptions"] += 1
        self.waiting.appendleft(req)

    def _free(self, req: _Request) -> None:
        for pool, blocks in zip(self.groups, req.blocks):
            pool.release([b for b in blocks if b])
        req.blocks, req.computed, req.registered = [], 0, 0

    # ------------------------------------------------------------------ running the graphs
    def _tables(self, reqs: list[_Request]) -> list[torch.Tensor]:
        """One block table per KV group, all of one width (the graphs share that dimension)."""
        width = max(len(b) for r in reqs for b in r.blocks)
        return [torch.tensor([r.blocks[g] + [0] * (width - len(r.blocks[g])) for r in reqs], dtype=torch.long)
                for g in range(len(self.groups))]

    def _slots(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        blocks = table.gather(1, (positions // self.block_size).reshape(table.shape[0], -1))
        return (blocks * self.block_size).reshape(positions.shape) + positions % self.block_size

    def _run(self, work: list[tuple[_Request, int]]) -> dict[int, torch.Tensor]:
        """Graph calls for this step; logits [V] by row index into ``work``."""
        device, run = self.kv.device, self.runner.executor.run
        out: dict[int, torch.Tensor] = {}
        decode = [i for i, (_, n) in enumerate(work) if n == 1]
        chunks = [i for i, (_, n) in enumerate(work) if n > 1]
        if decode:
            reqs = [work[i][0] for i in decode]
            tables = [t.to(device) for t in self._tables(reqs)]
            pos = torch.tensor([r.computed for r in reqs], dtype=torch.long, device=device)  # [B]
            ids = torch.tensor([[r.tokens[r.computed]] for r in reqs], dtype=torch.long, device=device)  # [B, 1]
            logits = run("decode", {Role.TOKENS: ids, Role.POSITIONS: pos, Role.BLOCK_TABLE: tables,
                                    Role.SLOT_MAPPING: [self._slots(t, pos) for t in tables], Role.POOL: self.kv.pools})
            out.update(zip(decode, logits.float()))
        if chunks:
            reqs = [work[i][0] for i in chunks]
            counts = [work[i][1] for i in chunks]
            width = max(counts)
            tables = [t.to(device) for t in self._tables(reqs)]
            start = torch.tensor([r.computed for r in reqs], dtype=torch.long, device=device)  # [B]
            ids = torch.tensor([r.tokens[r.computed:r.computed + n] + [0] * (width - n) for r, n in zip(reqs, counts)],
                               dtype=torch.long, device=device)  # [B, S] right-padded
            count = torch.tensor(counts, dtype=torch.long, device=device)
            offsets = torch.arange(width, device=device).unsqueeze(0)
            valid = offsets < count.unsqueeze(1)
            positions = torch.where(valid, start.unsqueeze(1) + offsets, 0)
            # padding writes go to scratch block 0
            slots = [torch.where(valid, self._slots(t, positions), 0) for t in tables]
            inputs = {Role.TOKENS: ids, Role.LAST_IDX: count - 1, Role.BLOCK_TABLE: tables, Role.SLOT_MAPPING: slots,
                      Role.POOL: self.kv.pools}
            phase = "prefill"
            if bool((start > 0).any()):
                inputs[Role.POSITIONS], phase = start, "extend"
            logits = run(phase, inputs)
            out.update(zip(chunks, logits.float()))
            self.counters["chunk_rows"] += len(chunks)
        return out

    # ------------------------------------------------------------------ after the graphs
    def _advance(self, work: list[tuple[_Request, int]], logits: dict[int, torch.Tensor]) -> None:
        now = time.perf_counter()
        for i, (req, n) in enumerate(work):
            if req.status != "running":  # cancelled meanwhile cannot happen under the lock; be safe
                continue
            req.computed += n
            self._register(req)
            if req.computed < len(req.tokens):
                continue  # a chunk of the prompt: no token yet
            token, logprob = self._sample(req, logits[i])
            req.tokens.append(token)
            if req.params.logprobs:
                req.logprobs.append(logprob)
            if req.metrics["first_token"] is None:
                req.metrics["first_token"] = now
            self._emit(req, token, now)

    def _register(self, req: _Request) -> None:
        """Make the request's full, computed blocks findable by later prompts (and by itself after a preemption)."""
        full = req.computed // self.block_size
        if not self.prefix_cache or full <= req.registered:
            return
        hashes = block_hashes(req.tokens, self.block_size, full * self.block_size)[req.registered:]
        for pool, blocks in zip(self.groups, req.blocks):
            for block, h in zip(blocks[req.registered:full], hashes):
                if block:
                    pool.register(block, h)
        req.registered = full

    def _sample(self, req: _Request, logits: torch.Tensor) -> tuple[int, float | None]:
        p = req.params
        if p.greedy:
            token = int(logits.argmax())
            scores = logits
        else:
            scores = (logits / p.temperature).unsqueeze(0)
            if p.top_k:
                scores = lp.TopKLogitsWarper(top_k=p.top_k)(None, scores)
            if p.top_p < 1.0:
                scores = lp.TopPLogitsWarper(top_p=p.top_p)(None, scores)
            scores = scores[0]
            token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=req.generator))
        logprob = float(torch.log_softmax(scores, -1)[token]) if p.logprobs else None
        return token, logprob

    def _emit(self, req: _Request, token: int, now: float) -> None:
        """Stream the new token; finish the request if a stop condition holds."""
        p = req.params
        reason = None
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif len(req.output) >= p.max_tokens or len(req.tokens) >= self.runner.max_seq_len:
            reason = "length"
        if self.tokenizer is not None:
            req.text = self.tokenizer.decode(req.output, skip_special_tokens=True)
            cut = min((i for i in (req.text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                req.text, reason = req.text[:cut], "stop"
        if reason is not None:
            self._finish(req, reason)
        else:
            req.sink(self._delta(req, final=False))

    def _delta(self, req: _Request, final: bool) -> RequestOutput:
        tokens = req.output[req.sent_tokens:]
        logprobs = req.logprobs[req.sent_tokens:] if req.params.logprobs else None
        req.sent_tokens += len(tokens)
        # Hold back text that may still become a stop string, or an incomplete UTF-8 character.
        end = len(req.text)
        if not final:
            end -= max((len(s) for s in req.params.stop), default=1) - 1
            while end > req.sent and req.text[end - 1] == "\ufffd":
                end -= 1
        text = req.text[req.sent:max(end, req.sent)]
        req.sent += len(text)
        return RequestOutput(req.id, tokens, text, logprobs=logprobs)

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        if req.status == "finished":
            return
        if req.status == "running":
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._free(req)
        req.status = "finished"
        self._requests.pop(req.id, None)
        req.metrics["finished"] = time.perf_counter()
        req.metrics["output_tokens"] = len(req.output)
        if error:
            req.metrics["error"] = error
        out = self._delta(req, final=True)
        out.finished, out.finish_reason, out.metrics = True, reason, dict(req.metrics)
        self.counters[f"finished_{reason}"] += 1
        req.sink(out)

    # ------------------------------------------------------------------ introspection
    def stats(self) -> dict:
        """Running / waiting requests, KV blocks (in use, cached, free), prefix-cache counters."""
        with self.lock:
            pool = self.pool.stats()
            return {"running": len(self.running), "waiting": len(self.waiting) + len(self._incoming),
                    "kv_blocks_total": pool["blocks"], "kv_blocks_used": pool["in_use"],
                    "kv_blocks_free": pool["free"] + pool["cached"], "kv_blocks_cached": pool["cached"],
                    **dict(self.counters)}

    # ------------------------------------------------------------------ offline use
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Run ``prompts`` (lists of token ids) to completion; completions in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        streams = [self.submit(p, sp) for p, sp in zip(prompts, params_list)]
        return [s.result() for s in streams]


def generate_batch(model, inputs, generation_config=None, continuous_batching_config=None, record_timestamps=False,
                   progress_bar=False, persistent_manager=False, warmup=True, *, request_ids, **kwargs) -> dict:
    """transformers' ``ContinuousMixin.generate_batch`` on the engine (see OptimizedModel.generate_batch)."""
    from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus

    from .generation import resolve_config

    if not inputs:
        return {}
    max_new = kwargs.pop("max_new_tokens", None)
    config, unknown, _ = resolve_config(model.generation_config, generation_config, kwargs)
    if unknown:
        raise TypeError(f"generate_batch() got arguments that are not generation config fields: {sorted(unknown)}")
    max_new = config.max_new_tokens if max_new is None else max_new
    cb = continuous_batching_config
    eos = config.eos_token_id if config.eos_token_id is not None else getattr(model.config, "eos_token_id", None)
    eos = () if eos is None else tuple(t for t in torch.as_tensor(eos).reshape(-1).tolist() if t >= 0)
    seed = getattr(cb, "seed", None)
    n = config.num_return_sequences or 1
    engine = Engine(model, max_num_seqs=getattr(cb, "max_requests_per_batch", None) or None,
                    max_prefill_tokens=getattr(cb, "max_batch_tokens", None) or 256)
    streams, counter = [], itertools.count()
    for prompt in inputs:
        rid = next(request_ids)
        # HF's order: the forked children first, then the parent
        for rid_i in [f"{rid}__child#{i}" for i in range(n - 1)] + [rid]:
            limit = model.runner.max_seq_len - len(prompt)  # max_new_tokens=None: no limit but the model's
            sample = bool(config.do_sample)
            params = SamplingParams(
                max_tokens=max(1, min(limit, max_new)) if max_new is not None else max(1, limit),
                temperature=float(config.temperature or 1.0) if sample else 0.0,
                top_k=int(config.top_k or 0) if sample else 0, top_p=float(config.top_p or 1.0) if sample else 1.0,
                seed=None if seed is None else seed + next(counter), stop_token_ids=eos, ignore_eos=True,
                logprobs=bool(getattr(cb, "return_logprobs", False)))
            streams.append((prompt, engine.submit(list(prompt), params, request_id=rid_i), time.perf_counter()))
    results = {}
    for prompt, stream, created in streams:
        outs, stamps = [], []
        for out in stream:
            outs.append(out)
            stamps.extend([time.perf_counter()] * len(out.token_ids))
        done = _join(stream.request_id, prompt, outs)
        error = done.metrics.get("error")
        results[stream.request_id] = GenerationOutput(
            request_id=stream.request_id, prompt_ids=list(prompt), generated_tokens=done.token_ids,
            logprobs=done.logprobs, error=error, status=RequestStatus.FAILED if error else RequestStatus.FINISHED,
            created_time=created, lifespan=(done.metrics.get("scheduled") or -1, done.metrics.get("finished") or -1),
            timestamps=stamps if record_timestamps else None)
    return results
