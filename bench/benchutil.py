"""Shared plumbing of the PyTorch comparison scripts: medians and this machine's limits."""
import json
import os
import statistics
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def median_ms(fn, reps, min_time):
    """One warm-up call (workspace growth, first touch), then runs fn until both `reps` runs and
    `min_time` seconds are reached; the median in ms."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def machine_peak(threads):
    """`build/qllm bench peak --json`, the row for `threads` (measured now, in the same run)."""
    cli = os.path.join(HERE, "..", "build", "qllm")
    out = subprocess.run([cli, "bench", "peak", "--json"], check=True, capture_output=True, text=True).stdout
    peak = {}
    for line in out.splitlines():
        j = json.loads(line)
        if j["threads"] == threads:
            peak = j
    return peak
