"""How busy the CPU is, without importing torch (OpenMP reads ``OMP_WAIT_POLICY`` once, when torch loads).

Example:
    >>> from unetseg.cpuload import machine_is_busy
    >>> isinstance(machine_is_busy(), bool)
    True
"""

from __future__ import annotations

import os
import time

__all__ = ["machine_is_busy"]


def _runnable_now(samples: int = 5, interval_s: float = 0.1) -> float | None:
    """Mean count of other runnable threads over ``samples`` reads of ``/proc/stat`` (Linux), else None."""
    counts = []
    try:
        for i in range(samples):
            if i:
                time.sleep(interval_s)
            with open("/proc/stat") as f:
                line = next(ln for ln in f if ln.startswith("procs_running"))
            counts.append(int(line.split()[1]) - 1)  # minus the thread reading it
    except (OSError, StopIteration, ValueError):
        return None
    return sum(counts) / len(counts)


def machine_is_busy() -> bool:
    """Whether other work already keeps >= 0.75 x the cores busy: then spinning thread pools (OpenMP,
    ONNX Runtime) starve the thread doing the work (BENCHMARKS.md, "OpenMP under load").

    The 1-minute load average must say so, and, where Linux shows it, so must the runnable-thread count
    sampled over half a second now: the load average still counts a job that ended seconds ago (a
    benchmark started right after a training run would otherwise run as if the machine were shared).
    """
    cores = os.cpu_count() or 1
    if not hasattr(os, "getloadavg") or os.getloadavg()[0] < 0.75 * cores:
        return False
    now = _runnable_now()
    return now is None or now >= 0.75 * cores
