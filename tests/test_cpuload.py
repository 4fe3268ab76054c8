"""When the CPU counts as busy (spinning thread pools are then turned passive)."""

from __future__ import annotations

import sys

import pytest

from unetseg import cpuload


@pytest.mark.parametrize(
    ("load", "runnable_now", "busy"),
    [
        (0.5, 4.0, False),  # the load average is low: no sampling needed
        (3.0, 0.0, False),  # a job that just ended still weighs in the load average, but nothing runs now
        (3.0, 2.0, True),  # both say so
        (3.0, None, True),  # no /proc/stat: the load average decides
    ],
)
def test_machine_is_busy_needs_the_load_average_and_the_present(monkeypatch, load, runnable_now, busy) -> None:
    monkeypatch.setattr(cpuload.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cpuload.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(cpuload, "_runnable_now", lambda: runnable_now)
    assert cpuload.machine_is_busy() is busy


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_runnable_now_reads_proc_stat() -> None:
    now = cpuload._runnable_now(samples=2, interval_s=0.01)
    assert now is not None and now >= 0
