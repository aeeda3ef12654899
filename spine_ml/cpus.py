"""The CPUs this process may use: its affinity on Linux (a container or `taskset` may allow fewer
than the machine has), the machine's count elsewhere. Used by prepare and synth (process pools) and
training (torch threads)."""
from __future__ import annotations

import os


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
