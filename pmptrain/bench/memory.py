"""Memory measurements of a run: the process's peak resident set size (sampled) and the bytes of an
optimizer's state. See :mod:`pmptrain.bench.runner` for how they are reported."""

from __future__ import annotations

import os
import resource
import sys
import threading
from typing import Optional, Tuple

import torch

__all__ = ["PeakRSS", "state_bytes"]


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


class PeakRSS:
    """Context manager sampling the process RSS every ``interval`` s (default 0.01).

    ``peak`` is the highest RSS seen, read from ``/proc/self/statm`` (Linux); without ``/proc``,
    :meth:`result_mb` falls back to ``getrusage``'s lifetime high-water mark."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.start = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = None

    def _loop(self):
        while not self._stop.wait(self.interval):
            r = _rss_bytes()
            if r is not None and r > self.peak:
                self.peak = r

    def __enter__(self):
        if self.start is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            r = _rss_bytes()
            self.peak = max(self.peak, r or 0)
        return False

    def result_mb(self) -> Tuple[float, float]:
        """``(peak_rss_mb, rss_increase_mb)``."""
        if self.start is None:
            m = _maxrss_bytes() / 2**20
            return m, float("nan")
        return self.peak / 2**20, (self.peak - self.start) / 2**20


def state_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0
