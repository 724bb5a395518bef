"""pdcompile serve: the OpenAI-compatible server, over real HTTP on loopback.

Clients: the official ``openai`` package and plain httpx. The model is a tiny random Llama
with a word-level tokenizer; greedy answers are checked against HF's generate() on the
same prompt, decoded with the same tokenizer.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

import models
from conftest import optimized
from test_engine import OPTIONS, reference, with_pool

openai = pytest.importorskip("openai", reason="the openai client is in the dev extra")
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is in the serve extra")

from pdcompile.engine import Engine  # noqa: E402
from pdcompile.serve import create_app  # noqa: E402

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tokenizer():
    tok = models.word_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def words(ids):
    return " ".join(f"w{i}" for i in ids)


@pytest.fixture(scope="module")
def server():
    hf, fast = optimized("llama", "eager", **OPTIONS)
    engine = Engine(with_pool(fast, 64), tokenizer=tokenizer(), max_prefill_tokens=32)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", engine, hf
    srv.should_exit = True
    thread.join(timeout=30)
    assert not engine.running_thread  # the lifespan shut the engine down


def expected_text(hf, prompt_ids, n):
    return tokenizer().decode(reference(hf, prompt_ids, n), skip_special_tokens=True)


def test_openai_client_completions_and_chat(server):
    url, engine, hf = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    ids = list(range(30, 60))  # words w30..: the tokenizer's special tokens w0, w1, w2 match inside w10..w29
    want = expected_text(hf, ids, 12)
    r = client.completions.create(model="tiny", prompt=words(ids), max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.usage.prompt_tokens == 30
    assert r.usage.completion_tokens == len(reference(hf, ids, 12)) and r.usage.total_tokens == 30 + r.usage.completion_tokens
    chunks = list(client.completions.create(model="tiny", prompt=words(ids), max_tokens=12, temperature=0, stream=True))
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # chat: the template joins the contents with spaces
    chat_ids = list(range(60, 70)) + list(range(70, 75))
    messages = [{"role": "system", "content": words(chat_ids[:10])}, {"role": "user", "content": words(chat_ids[10:])}]
    want = expected_text(hf, chat_ids, 8)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == 15
    stream = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == len(reference(hf, chat_ids, 8))
    assert [m.id for m in client.models.list().data] == ["tiny"]
    # sampled with a seed: reproducible
    a, b = (client.completions.create(model="tiny", prompt=words(ids), max_tokens=8, temperature=1.0, seed=4).choices[0].text
            for _ in range(2))
    assert a == b


def test_plain_http_errors_health_and_metrics(server):
    url, engine, hf = server
    with httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/health").json() == {"status": "ok"}
        ok = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == expected_text(hf, [5, 6, 7], 3)
        cases = [
            (c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
            (c.post("/v1/completions", json={"prompt": "w5", "max_tokens": "many"}), 400, "max_tokens"),
            (c.post("/v1/completions", json={"prompt": "w5", "max_tokens": 0}), 400, "max_tokens=0"),
            (c.post("/v1/completions", json={"prompt": "w5", "max_tokens": 300}), 400, "between 1 and 255"),
            (c.post("/v1/completions", json={"prompt": [5] * 300}), 400, "at most 255"),
            (c.post("/v1/completions", json={"prompt": [5, 999]}), 400, "vocabulary"),
            (c.post("/v1/completions", json={"prompt": "w5", "temperature": -1}), 400, "temperature"),
            (c.post("/v1/completions", json={"prompt": "w5", "n": 2}), 400, "n=2"),
            (c.post("/v1/completions", json={"max_tokens": 2}), 400, "prompt"),
            (c.post("/v1/chat/completions", json={"messages": []}), 400, "messages"),
            (c.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]}), 400, "role"),
            (c.post("/v1/completions", json={"prompt": "w5", "model": "gpt-9"}), 404, "gpt-9"),
        ]
        for response, status, needle in cases:
            assert response.status_code == status, (needle, response.text)
            assert needle in response.json()["error"]["message"], (needle, response.text)
        # a full queue: 503, and nothing else changes
        engine.max_queue, saved = 0, engine.max_queue
        try:
            full = c.post("/v1/completions", json={"prompt": "w5"})
        finally:
            engine.max_queue = saved
        assert full.status_code == 503 and "queue is full" in full.json()["error"]["message"]
        metrics = c.get("/metrics").text
    for name in ("pdcompile_time_to_first_token_seconds_count", "pdcompile_time_per_output_token_seconds_bucket",
                 "pdcompile_queue_time_seconds_sum", "pdcompile_requests_running", "pdcompile_requests_waiting",
                 "pdcompile_kv_blocks_used", "pdcompile_kv_blocks_free", "pdcompile_prefix_cache_hit_rate"):
        assert name in metrics
    count = next(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("pdcompile_time_to_first_token_seconds_count"))
    assert count >= 1


def test_client_disconnect_cancels(server):
    url, engine, hf = server
    aborted = engine.counters["finished_abort"]
    saved, engine.eos = engine.eos, set()  # never stop early: the request must still be running when we leave
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 250, "stream": True}) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))
        deadline = time.time() + 20
        while engine.counters["finished_abort"] == aborted and time.time() < deadline:
            time.sleep(0.02)
    finally:
        engine.eos = saved
    assert engine.counters["finished_abort"] == aborted + 1
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0


def test_cli_serve_and_graceful_shutdown(tmp_path):
    """`pdcompile serve FOLDER` in its own process; SIGTERM lets the request in flight finish."""
    path = tmp_path / "tiny"
    models.build("llama").save_pretrained(path)
    tokenizer().save_pretrained(path)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pdcompile", "serve", str(path), "--backend", "eager",
                             "--port", str(port), "--max-seq-len", "256", "--max-batch-size", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
            assert proc.poll() is None, proc.stdout.read()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        stream = client.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=200, temperature=0, stream=True)
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)  # the stream in flight runs to its end
        assert (rest or [first])[-1].choices[0].finish_reason in ("stop", "length")
        text = first.choices[0].text + "".join(c.choices[0].text for c in rest)
        hf = models.build("llama")
        assert text == expected_text(hf, [5, 6, 7], 200)
        # uvicorn re-raises the signal once it has shut down: the exit status says SIGTERM
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        out = " ".join(proc.stdout.read().split())  # the log lines wrap
        assert "engine stopped: 1 requests finished" in out and "0 aborted, 0 failed" in out, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
