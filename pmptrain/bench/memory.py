"""Memory measurements of a run: the process's peak resident set size and the bytes of an optimizer's
state. See :mod:`pmptrain.bench.runner` for how they are reported.

The peak is the kernel's own high-water mark (``VmHWM`` in ``/proc/self/status``), reset at the start
of a measurement by writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0): exact, however short
the peak. (Before issue 17 a thread sampled the RSS every 10 ms, which misses the peak of a 3 ms
step, and ``benchmarks/step_time.py`` read ``getrusage``'s lifetime maximum, which for a small model
is the peak of importing torch: every optimizer then "equalled" SGD.) Where the reset is not
possible the RSS is sampled as before. ``tracemalloc`` is not used: it does not see torch's CPU
allocator.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from typing import Optional, Tuple

import torch

__all__ = ["PeakRSS", "peak_rss_bytes", "reset_peak_rss", "rss_bytes", "state_bytes"]


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def rss_bytes() -> Optional[int]:
    """The resident set size of this process now (None without ``/proc``)."""
    return _rss_bytes()


def peak_rss_bytes() -> Optional[int]:
    """The kernel's peak RSS of this process since it started or since the last
    :func:`reset_peak_rss` (``VmHWM``; None without ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process to its current RSS
    (``/proc/self/clear_refs``); False where the system does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return peak_rss_bytes() is not None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class PeakRSS:
    """Context manager measuring the peak RSS of the process inside the block.

    ``peak`` is the kernel's high-water mark, reset on entry (:func:`reset_peak_rss`; ``exact`` is
    then True), or where that is not possible the highest RSS sampled every ``interval`` s
    (default 0.01) from ``/proc/self/statm``; without ``/proc``, :meth:`result_mb` falls back to
    ``getrusage``'s lifetime high-water mark."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start = self.peak = _rss_bytes()
        self.exact = False
        self._stop = threading.Event()
        self._thread = None

    def _loop(self):
        while not self._stop.wait(self.interval):
            r = _rss_bytes()
            if r is not None and r > self.peak:
                self.peak = r

    def __enter__(self):
        self.start = self.peak = _rss_bytes()
        if self.start is not None and reset_peak_rss():
            self.exact = True
        elif self.start is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def read(self) -> None:
        """Bring ``peak`` up to date (also inside the block)."""
        if self.exact:
            self.peak = max(self.peak, peak_rss_bytes() or 0)

    def __exit__(self, *exc):
        self._stop.set()
        if self.exact:
            self.read()
        elif self._thread is not None:
            self._thread.join()
            r = _rss_bytes()
            self.peak = max(self.peak, r or 0)
        return False

    def result_mb(self) -> Tuple[float, float]:
        """``(peak_rss_mb, rss_increase_mb)``."""
        if self.start is None:
            m = _maxrss_bytes() / 2**20
            return m, float("nan")
        self.read()
        return self.peak / 2**20, (self.peak - self.start) / 2**20


def state_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0
