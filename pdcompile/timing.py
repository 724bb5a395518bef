"""Measuring TTFT and TPOT of any generate(), HF's or ours, the same way.

HF's generate() calls ``streamer.put()`` with the prompt, then once per new token;
recording the time of each call gives TTFT (first token minus the start of the call)
and TPOT (median gap between tokens) without touching the model's code.
"""

from __future__ import annotations

import statistics
import time

from transformers.generation.streamers import BaseStreamer


class TimingStreamer(BaseStreamer):
    def __init__(self):
        self.start = time.perf_counter()
        self.token_times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # the first put() is the prompt
            self._prompt_seen = True
            return
        self.token_times.append(time.perf_counter())

    def end(self):
        pass

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.start

    @property
    def tpot_s(self) -> float:
        gaps = [b - a for a, b in zip(self.token_times, self.token_times[1:])]
        return statistics.median(gaps) if gaps else float("nan")

    @property
    def step_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


def timed_generate(model, **kwargs):
    """Run ``model.generate(**kwargs)`` with a :class:`TimingStreamer`; return (output, streamer)."""
    streamer = TimingStreamer()
    out = model.generate(streamer=streamer, **kwargs)
    return out, streamer
