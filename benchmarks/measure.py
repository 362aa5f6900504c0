"""Timing and peak-memory measurement shared by every benchmark case.

Methods of one case are timed round-robin (A, B, C, A, B, C, ...) so that a
change in machine load hits all of them alike; the median and the spread
(min, max) are reported. Peak memory is measured in one extra call per
method (a sampling thread would slow the timed calls): the growth of the
process RSS over its level at the start of the call (CPU; sampled every ms),
or torch's peak allocated bytes on CUDA.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.seconds), max(self.seconds)

    @property
    def peak(self) -> float:
        return statistics.median(self.peak_mb)


class _RssPeak:
    """Highest RSS seen while open, sampled from a side thread (torch ops drop the GIL)."""

    def __init__(self) -> None:
        self.proc = psutil.Process(os.getpid())
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_once(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one call, nothing else running in the process."""
    gc.collect()
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def peak_once(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory growth (MB) of one call; its own run, as the sampler slows Python down."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with _RssPeak() as rss:
        fn()
    return rss.growth_mb


def compare(methods: dict[str, Callable[[], object]], repeats: int, device: torch.device,
            warmup: int = 1) -> tuple[dict[str, Timing], dict[str, object]]:
    """Time every method `repeats` times, interleaved, then measure each one's peak memory
    once; also return each one's last result."""
    results: dict[str, object] = {}
    for _ in range(warmup):
        for name, fn in methods.items():
            results[name] = fn()
    timings = {name: Timing() for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            seconds, results[name] = run_once(fn, device)
            timings[name].seconds.append(seconds)
    for name, fn in methods.items():
        timings[name].peak_mb.append(peak_once(fn, device))
    return timings, results
