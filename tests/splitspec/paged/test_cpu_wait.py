"""The run-queue delay of this process's threads (`splitspec.paged.cpu_wait`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from splitspec.paged.cpu_wait import cpu_wait_ns


def test_cpu_wait_counts_the_time_a_busy_neighbour_holds_the_core():
    """Pinned to one CPU beside a process spinning on it, a busy loop waits for about half its
    time; the same loop alone on that CPU hardly at all (the calibration's quiet test, QUIET_SHARE)."""
    if cpu_wait_ns() is None:
        pytest.skip("this kernel keeps no per-thread run-queue delay (/proc/self/task/*/schedstat)")
    script = textwrap.dedent("""
        import os, subprocess, sys, time
        from splitspec.paged.cpu_wait import cpu_wait_ns
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        def share():
            waited, started = cpu_wait_ns(), time.perf_counter()
            while time.perf_counter() - started < 0.4:
                pass
            return (cpu_wait_ns() - waited) / 1e9 / (time.perf_counter() - started)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # inherits the one CPU
        time.sleep(0.2)
        try:
            loaded = share()
        finally:
            busy.kill()
            busy.wait()
        print(loaded)
    """)
    loaded = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                                  timeout=60).stdout)
    assert loaded > 0.2, loaded  # two runnable threads on one CPU: each waits about half the time
