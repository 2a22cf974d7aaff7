"""The one timer: warm-up, then repeated runs over rotating inputs until the median is stable; percentiles in ms."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LatencyStats:
    """Latency of one call, in milliseconds, over `runs` timed runs."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    stdev_ms: float
    runs: int
    samples_ms: list[float] = field(default_factory=list, repr=False)
    block_p50_ms: list[float] = field(default_factory=list, repr=False)  # interleaved timing: each block's median

    def as_dict(self) -> dict[str, float]:
        """Return the statistics (not the samples), rounded to 0.1 µs."""
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in vars(self).items()
                if k not in ("samples_ms", "block_p50_ms")}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Return the q-th percentile (0..100) of sorted values, by linear interpolation."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_ms: Sequence[float]) -> LatencyStats:
    """Return the statistics of latency samples in ms."""
    s = sorted(samples_ms)
    return LatencyStats(p50_ms=percentile(s, 50), p90_ms=percentile(s, 90), p99_ms=percentile(s, 99),
                        mean_ms=statistics.fmean(s), stdev_ms=statistics.stdev(s) if len(s) > 1 else 0.0, runs=len(s),
                        samples_ms=list(samples_ms))


def time_block(fn: Callable[[Any], Any], inputs: Sequence[Any], start: int, n: int, settle: int = 0) -> list[float]:
    """Return the ms of each of `n` calls of fn on inputs[(start + j) % len], after `settle` untimed calls from the
    same place. A runtime that times itself (fn.time_calls, same arguments: a browser page's performance.now(), where a
    call from Python costs a page round trip) is asked to; any other fn is timed around each call."""
    in_runtime = getattr(fn, "time_calls", None)
    if in_runtime is not None:
        return [float(x) for x in in_runtime(inputs, start, n, settle)]
    for j in range(settle):
        fn(inputs[(start + j) % len(inputs)])
    block = []
    for j in range(n):
        x = inputs[(start + j) % len(inputs)]
        t0 = time.perf_counter_ns()
        fn(x)
        block.append((time.perf_counter_ns() - t0) / 1e6)
    return block


def measure(fn: Callable[[Any], Any], inputs: Sequence[Any], warmup: int = 5, min_runs: int = 20,
            max_runs: int = 500, min_time_s: float = 1.0) -> LatencyStats:
    """Time fn(inputs[i % len(inputs)]): `warmup` untimed calls, then at least `min_runs` runs and `min_time_s` seconds."""
    if not inputs:
        raise ValueError("measure() needs at least one input")
    time_block(fn, inputs, 0, 0, settle=warmup)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - start < min_time_s):
        # one call at a time from Python; a self-timing runtime gets blocks of up to 20 (its round trips are slow)
        n = 1 if not hasattr(fn, "time_calls") else min(20, max_runs - len(samples))
        samples += time_block(fn, inputs, len(samples), n)
    return summarize(samples)


def measure_interleaved(candidates: dict[str, tuple[Callable[[Any], Any], Sequence[Any]]], warmup: int = 5,
                        min_blocks: int = 5, min_time_s: float = 3.0, block_s: float = 0.2,
                        settle: int = 2) -> dict[str, LatencyStats]:
    """Time several candidates in interleaved blocks of about `block_s` seconds each, every candidate in turn.

    Each block starts with `settle` untimed calls, which absorb the switch between runtimes (the previous one's
    worker threads still spinning, this one's pool waking up), then times calls on rotating inputs. Blocks of
    different candidates run a fraction of a second apart, so a noisy neighbour's bursts hit all candidates alike and
    `paired_ratio` of two candidates' block medians holds on a loaded machine. Measured here at 2 threads: switching
    runtimes on every call slowed each side by its neighbour's idle threads (torch 23.5 -> 90 ms beside spinning
    onnxruntime pools; the artifact/teacher ratio 0.16 in isolation read 0.23), hence blocks and settle calls.
    Stops after at least `min_blocks` blocks per candidate and `min_time_s` seconds in all. A candidate that times
    itself (`time_block`: a browser page) runs each block inside its runtime and reports the block's calls.
    """
    per_call_s = {}
    for name, (fn, inputs) in candidates.items():
        if not inputs:
            raise ValueError("measure_interleaved() needs at least one input per candidate")
        times = time_block(fn, inputs, 0, warmup)
        per_call_s[name] = max(statistics.median(times) / 1e3, 1e-6)
    block_n = {name: max(3, min(200, int(block_s / t))) for name, t in per_call_s.items()}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    blocks: dict[str, list[float]] = {name: [] for name in candidates}
    start = time.perf_counter()
    k = 0
    while k < min_blocks or time.perf_counter() - start < min_time_s:
        for name, (fn, inputs) in candidates.items():
            block = time_block(fn, inputs, k, block_n[name], settle)
            samples[name] += block
            blocks[name].append(statistics.median(block))
        k += 1
    stats = {name: summarize(v) for name, v in samples.items()}
    for name, stat in stats.items():
        stat.block_p50_ms = blocks[name]
    return stats


def paired_ratio(samples: Sequence[float], reference: Sequence[float]) -> float:
    """Return the median of samples[i] / reference[i]: the latency ratio of two interleaved candidates
    (pass their `block_p50_ms`)."""
    if len(samples) != len(reference) or not samples:
        raise ValueError("paired_ratio() needs two equally long, non-empty sample lists")
    return statistics.median(a / b for a, b in zip(samples, reference))
