"""``pdcompile serve``: an OpenAI-compatible HTTP server over :class:`~pdcompile.engine.Engine`.

FastAPI + uvicorn (the ``serve`` extra). Endpoints:

* ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template):
  ``max_tokens`` (chat: also ``max_completion_tokens``), ``temperature`` (OpenAI's default 1;
  0 is greedy), ``top_p``, ``top_k``, ``seed``, ``stop``, ``stream`` (server-sent events, then
  ``data: [DONE]``; ``stream_options.include_usage`` adds a usage chunk), ``usage`` counts.
  One choice per request (``n`` = 1). Fields pdcompile does not read are ignored.
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus: TTFT / TPOT / queue-time
  / end-to-end histograms, running and waiting requests, KV blocks used and free,
  prefix-cache hit rate, tokens and requests by finish reason).

Bad requests (malformed JSON, wrong types, a prompt over the limit, ``max_tokens`` out of
range, an unknown model) get 400 (404 for the model) with OpenAI's error body; a full queue
503. A client that disconnects cancels its request (its KV blocks are freed). On shutdown
uvicorn stops accepting, lets requests in flight finish (``--shutdown-timeout``), then the
engine aborts what is left, each request ending with a final event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Literal, Union

from .engine import Engine, EngineFull, EngineStopped, SamplingParams
from .kv_cache import CapacityError

logger = logging.getLogger(__name__)

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("pdcompile serve needs the serve extra: pip install 'pdcompile[serve]'") from e


class _Params(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None


class CompletionRequest(_Params):
    prompt: Union[str, list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict], None] = None


class ChatRequest(_Params):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def _error(message: str, status: int, param: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "service_unavailable"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


class Metrics:
    """Prometheus metrics of one app (its own registry, so that several apps can live in one process)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        fast = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
        self.ttft = Histogram("pdcompile_time_to_first_token_seconds", "arrival to first token", registry=r, buckets=fast)
        self.tpot = Histogram("pdcompile_time_per_output_token_seconds", "mean time between a request's tokens",
                              registry=r, buckets=fast)
        self.queue = Histogram("pdcompile_queue_time_seconds", "arrival to first scheduled", registry=r, buckets=fast)
        self.e2e = Histogram("pdcompile_e2e_request_latency_seconds", "arrival to finish", registry=r, buckets=fast)
        self.finished = Counter("pdcompile_requests", "finished requests by reason", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("pdcompile_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.output_tokens = Counter("pdcompile_generation_tokens", "generated tokens", registry=r)

        def gauge(name, doc, fn):
            Gauge(name, doc, registry=r).set_function(fn)

        gauge("pdcompile_requests_running", "requests running", lambda: engine.stats()["running"])
        gauge("pdcompile_requests_waiting", "requests waiting", lambda: engine.stats()["waiting"])
        gauge("pdcompile_kv_blocks_used", "KV blocks held by requests", lambda: engine.stats()["kv_blocks_used"])
        gauge("pdcompile_kv_blocks_free", "KV blocks free (cached blocks included)",
              lambda: engine.stats()["kv_blocks_free"])

        def hit_rate():
            s = engine.stats()
            return s.get("prefix_hit_tokens", 0) / max(s.get("prefix_query_tokens", 0), 1)

        gauge("pdcompile_prefix_cache_hit_rate", "prompt tokens served by the prefix cache / prompt tokens", hit_rate)

    def observe(self, reason: str, m: dict) -> None:
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(m["prompt_tokens"])
        self.output_tokens.inc(m.get("output_tokens", 0))
        if m.get("scheduled"):
            self.queue.observe(m["scheduled"] - m["arrival"])
        if m.get("first_token"):
            self.ttft.observe(m["first_token"] - m["arrival"])
            if m.get("output_tokens", 0) > 1:
                self.tpot.observe((m["finished"] - m["first_token"]) / (m["output_tokens"] - 1))
        self.e2e.observe(m["finished"] - m["arrival"])


def create_app(engine: Engine, model_name: str, *, shutdown_timeout: float = 30.0) -> "FastAPI":
    """The FastAPI app; its lifespan starts the engine's step loop and shuts it down."""
    tokenizer = engine.tokenizer
    metrics = Metrics(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        # uvicorn has let the requests in flight finish (or timed out); abort the rest
        await asyncio.to_thread(engine.shutdown, cancel=False, timeout=shutdown_timeout)
        c = engine.counters
        logger.info("engine stopped: %d requests finished (stop %d, length %d), %d aborted, %d failed",
                    sum(v for k, v in c.items() if k.startswith("finished_")), c["finished_stop"],
                    c["finished_length"], c["finished_abort"], c["finished_error"])

    app = FastAPI(title="pdcompile", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid JSON body")
        return _error(message, 400, where or None)

    @app.exception_handler(BadRequest)
    async def bad(request: Request, exc: BadRequest):
        return _error(str(exc), exc.status, exc.param)

    @app.get("/health")
    async def health():
        if not engine.running_thread:
            return _error("the engine is not running", 503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "pdcompile",
                                            "max_model_len": engine.runner.max_seq_len}]}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if isinstance(body.prompt, str):
            if tokenizer is None:
                raise BadRequest("this model has no tokenizer: send the prompt as a list of token ids", param="prompt")
            prompt = tokenizer(body.prompt)["input_ids"]
        else:
            prompt = body.prompt
        return await _serve(body, prompt, body.max_tokens, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise BadRequest("this model's tokenizer has no chat template: use /v1/completions", param="messages")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template that rejects these messages (e.g. roles out of order)
            raise BadRequest(f"the chat template rejected the messages: {e}", param="messages") from None
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _serve(body, prompt, limit, request, chat=True)

    def _params(body: _Params, prompt: list[int], max_tokens: int | None) -> SamplingParams:
        if body.model is not None and body.model != model_name:
            raise BadRequest(f"model {body.model!r} is not served here; this server serves {model_name!r}", 404, "model")
        if body.n != 1:
            raise BadRequest(f"n={body.n}: only one choice per request is supported", param="n")
        room = engine.runner.max_seq_len - len(prompt)
        if room < 1:
            raise BadRequest(f"the prompt has {len(prompt)} tokens; this model takes at most "
                             f"{engine.runner.max_seq_len - 1} (max_seq_len={engine.runner.max_seq_len}, with room "
                             "for one generated token)", param="prompt")
        if max_tokens is None:
            max_tokens = room
        if not 1 <= max_tokens <= room:
            raise BadRequest(f"max_tokens={max_tokens} is out of range: between 1 and {room} for this prompt of "
                             f"{len(prompt)} tokens (max_seq_len={engine.runner.max_seq_len})", param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        if stop and tokenizer is None:
            raise BadRequest("stop strings need a tokenizer, and this model has none", param="stop")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                  top_k=body.top_k, seed=body.seed, stop=tuple(stop))
        except ValueError as e:
            raise BadRequest(str(e).replace("SamplingParams.", "")) from None

    async def _serve(body: _Params, prompt, max_tokens, request: Request, chat: bool):
        params = _params(body, prompt, max_tokens)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            stream = engine.submit_async(prompt, params, request_id=rid)
        except (EngineFull, EngineStopped) as e:
            return _error(str(e), 503)
        except (ValueError, TypeError) as e:  # CapacityError, token ids outside the vocabulary
            raise BadRequest(str(e), param="prompt") from None
        created = int(time.time())
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_events(stream, rid, created, len(prompt), chat, usage),
                                     media_type="text/event-stream")
        watch = asyncio.create_task(_cancel_on_disconnect(request, rid))
        try:
            done = await stream.result()
        finally:
            watch.cancel()
        metrics.observe(done.finish_reason, done.metrics)
        if done.finish_reason == "error":
            return _error(f"generation failed: {done.metrics.get('error')}", 500)
        choice = ({"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": done.finish_reason}
                  if chat else {"index": 0, "text": done.text, "finish_reason": done.finish_reason, "logprobs": None})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": [choice], "usage": _usage(len(prompt), len(done.token_ids))}

    async def _cancel_on_disconnect(request: Request, rid: str):
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        logger.info("client disconnected: cancelling %s", rid)
        await asyncio.to_thread(engine.cancel, rid)

    async def _events(stream, rid, created, prompt_len, chat, include_usage):
        kind = "chat.completion.chunk" if chat else "text_completion"
        finished, count = False, 0

        def event(text, reason, first=False):
            if chat:
                delta = {"role": "assistant", "content": text} if first else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            return _sse({"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice]})

        try:
            first = True
            async for out in stream:
                count += len(out.token_ids)
                if out.finished:
                    finished = True
                    metrics.observe(out.finish_reason, out.metrics)
                if out.text or out.finished or first:
                    yield event(out.text, out.finish_reason if out.finished else None, first)
                    first = False
            if include_usage:
                yield _sse({"id": rid, "object": kind, "created": created, "model": model_name, "choices": [],
                            "usage": _usage(prompt_len, count)})
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (the response task was cancelled): free its blocks
                logger.info("client disconnected: cancelling %s", rid)
                try:  # off the event loop: cancel() waits for a step in flight
                    asyncio.get_running_loop().run_in_executor(None, engine.cancel, rid)
                except RuntimeError:  # closed outside the loop (garbage collection)
                    engine.cancel(rid)

    return app


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, *,
          shutdown_timeout: float = 30.0) -> None:
    """Run the server until SIGINT / SIGTERM (then the graceful shutdown described above)."""
    import uvicorn

    app = create_app(engine, model_name, shutdown_timeout=shutdown_timeout)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout)
