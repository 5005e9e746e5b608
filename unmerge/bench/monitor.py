"""Run a job in a child process and sample its memory: peak RSS and peak anonymous memory (``RssAnon``).

Memory-mapped safetensors pages count in RSS although they are reclaimable page cache, so the anonymous figure is
the one that memory targets refer to (design.md, "Measuring memory").
"""
from __future__ import annotations

import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")


@dataclass
class JobFigures:
    label: str
    seconds: float
    peak_rss_mb: float
    peak_anon_mb: float
    returncode: int
    output: str = ""
    cpu_seconds: float = 0.0  # user + system CPU time of the child (all its threads): what it cost, whatever the load


def median_run(runs: list[T], seconds: Callable[[T], float]) -> T:
    """The median of repeated runs by time (the upper one of the middle two for an even count)."""
    return sorted(runs, key=seconds)[len(runs) // 2]


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_monitored(label: str, argv: list[str], interval: float = 0.01, env: dict | None = None) -> JobFigures:
    """Run ``argv``; wall time, CPU time and sampled peaks of VmRSS and RssAnon of the child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peaks = {"VmRSS": 0, "RssAnon": 0}

    def sample() -> None:
        while proc.poll() is None:
            for key in peaks:
                peaks[key] = max(peaks[key], _status_kb(proc.pid, key))
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    thread.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # (children run one at a time here)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return JobFigures(label, seconds, peaks["VmRSS"] / 1024, peaks["RssAnon"] / 1024, proc.returncode, output, cpu)


def python_job(code: str) -> list[str]:
    return [sys.executable, "-c", code]
