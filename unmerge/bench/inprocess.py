"""Side-by-side timings of two code paths in one process: wall time, CPU time of the calling thread (what the path
cost, whatever else loads the machine; torch ops with one intra-op thread run on it) and the peak anonymous memory
(``RssAnon``) sampled while each runs."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Timed:
    seconds: float
    peak_anon_mb: float
    result: Any
    cpu_seconds: float = 0.0


def timed(fn: Callable[[], Any], interval: float = 0.01) -> Timed:
    """Run ``fn`` once; its wall time, thread CPU time and the peak RssAnon seen while it ran."""
    peak = [_rss_anon_mb()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_mb())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start, cpu_start = time.perf_counter(), time.thread_time()
    try:
        result = fn()
    finally:
        seconds, cpu_seconds = time.perf_counter() - start, time.thread_time() - cpu_start
        done.set()
        thread.join()
    return Timed(seconds, peak[0], result, cpu_seconds)
