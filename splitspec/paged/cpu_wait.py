"""How long this process's threads have waited for a CPU: the run-queue delay that Linux keeps per
thread (`/proc/self/task/*/schedstat`, its second field). A timing taken while other work held the
cores (a draft compiling beside a starting target) waited for most of its length; one taken on a
quiet machine waited for a fraction of a percent (a 48 ms matmul loop on 2 threads: 0.1-0.6%
idle, 50-85% beside one busy process on this 2-core VM)."""

from __future__ import annotations

import os

TASKS = "/proc/self/task"


def cpu_wait_ns() -> int | None:
    """Nanoseconds this process's threads have waited runnable for a CPU, summed over its live
    threads; None where the kernel does not say (not Linux, schedstat off)."""
    try:
        threads = os.listdir(TASKS)
    except OSError:
        return None
    total, read = 0, False
    for thread in threads:
        try:
            with open(f"{TASKS}/{thread}/schedstat", encoding="ascii") as handle:
                total += int(handle.read().split()[1])
            read = True
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended since the listing
    return total if read else None
