"""The bench's training clock (``--clock``): wall-clock or process CPU time.

``wall`` (the default) is ``time.perf_counter``: what a user waits for, and meaningless on a shared
machine, where a step's wall-clock time grows with everyone else's load. ``cpu`` is
``time.process_time``: the CPU seconds this process has spent, in user and system mode, summed over
all its threads. A process waiting for a core accrues none of it, so the figure does not grow with
the machine's load (contention for caches and memory bandwidth still inflates it somewhat). Because
it is a sum over the threads, it measures a step's work only when torch computes on one thread
(``--threads 1``); with more threads it adds up the threads' time (and their spinning while they
wait for each other), so :func:`check_clock` refuses ``cpu`` without ``threads = 1``. Under
``torchrun`` each rank's clock is its own process's.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional

from .schema import ConfigError

__all__ = ["CLOCKS", "CLOCK_SOURCES", "clock_fn", "check_clock", "clock_label"]

#: ``--clock`` name → the function read before and after every training step.
CLOCKS: Dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}

#: How the reports describe each clock.
CLOCK_SOURCES: Dict[str, str] = {"wall": "time.perf_counter",
                                 "cpu": "process CPU time, time.process_time, one thread"}


def clock_fn(name: str) -> Callable[[], float]:
    """The timer of ``--clock name`` (``"wall"`` or ``"cpu"``)."""
    return CLOCKS[name]


def check_clock(name: str, threads: Optional[int]) -> None:
    """Refuse ``--clock cpu`` unless torch computes on one thread (``threads == 1``): process CPU
    time sums the threads' time, so with several threads it is not the step's duration.

    Raises:
        ConfigError: naming ``--clock`` and ``--threads``.
    """
    if name == "cpu" and threads != 1:
        raise ConfigError(f"--clock cpu: process CPU time sums the time of all the process's threads, so it "
                          f"measures a step only with --threads 1 (got --threads {threads if threads else 'unset'}: "
                          "torch's default is one thread per core)")


def clock_label(name: str) -> str:
    """How tables name the clock's seconds: ``"wall-clock"`` or ``"CPU"``."""
    return "CPU" if name == "cpu" else "wall-clock"
