"""One spawn helper for multi-process tests: N ranks on CPU with the gloo backend.

``run_distributed(fn, world_size=2, args=())`` starts ``world_size`` fresh processes
(``torch.multiprocessing`` *spawn*), initialises ``torch.distributed`` in each (gloo,
``tcp://127.0.0.1:<free port>``), calls ``fn(rank, world_size, *args)`` and returns the list of the
ranks' return values (index = rank). Return values travel through ``torch.save`` files in a
temporary directory, so they may hold tensors. An exception in any child is re-raised in the parent
as a ``RuntimeError`` carrying every rank's traceback and stderr (``rank<k>.log``: native messages,
and faulthandler's stacks on a fatal signal); a spawn in which a child dies of a signal is run once
more (:class:`RankKilled` if it dies again); ranks that hang (a collective one rank never reaches)
dump their stacks and are killed after ``timeout`` seconds, and a ``TimeoutError`` carries the stacks.

``fn`` must be importable by the children (a module-level function of a test module or of this
file). Every child runs with ``torch.set_num_threads(1)``.
(Modelled on kfac-pytorch ``testing/distributed.py``.)
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import signal
import socket
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed", "free_port", "RankKilled"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, port: int, args: Sequence, out_dir: str):
    # ``rank`` is supplied first by torch.multiprocessing.start_processes
    # The rank's native stderr (gloo's and libc's messages before an abort) and, on a fatal signal,
    # the Python stack of every thread (faulthandler) go to rank<k>.log, which the parent reports.
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)  # the parent's timeout asks for stacks
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = fn(rank, world_size, *args)
        tmp = os.path.join(out_dir, f"rank{rank}.pt.tmp")
        torch.save(result, tmp)
        os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        # written before the process group goes down, i.e. before the other ranks fail in turn
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _tail(path: str, chars: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:].strip()
    except OSError:
        return ""


class RankKilled(RuntimeError):
    """A rank died of a signal (SIGABRT, SIGSEGV, …) rather than by a Python exception."""


def run_distributed(
    fn: Callable[..., Any], world_size: int = 2, args: Sequence = (), timeout: float = 120.0
) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo ranks; return the results.

    A spawn in which a rank dies of a signal (not of a Python exception: those are the tests'
    failures, and a hang is a ``TimeoutError``) is run once more, with a warning that carries every
    rank's report; a second death raises. (CI once lost a 4-rank FSDP2 spawn to a SIGABRT that 13
    reruns here did not reproduce; a defect of the code under test fails both runs.)"""
    try:
        return _run_once(fn, world_size, args, timeout)
    except RankKilled as e:
        with warnings.catch_warnings():  # reported, never raised (a caller's "error" filter must not end it here)
            warnings.simplefilter("always")
            warnings.warn(f"a rank died of a signal; running the spawn once more. {e}", RuntimeWarning, stacklevel=2)
    return _run_once(fn, world_size, args, timeout)


def _run_once(fn: Callable[..., Any], world_size: int, args: Sequence, timeout: float) -> List[Any]:
    with tempfile.TemporaryDirectory(prefix="pmptrain-dist-") as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(fn, world_size, free_port(), tuple(args), out_dir),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            # raises on the first failing rank and terminates the others
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    alive = [p for p in ctx.processes if p.is_alive()]
                    for p in alive:  # each stuck rank writes every thread's stack to its log
                        os.kill(p.pid, signal.SIGUSR1)
                    time.sleep(1.0)
                    for p in alive:
                        p.kill()
                    for p in ctx.processes:
                        p.join()
                    logs = [f"---- rank {r} stderr ----\n{_tail(os.path.join(out_dir, f'rank{r}.log'))}"
                            for r in range(world_size)]
                    raise TimeoutError(
                        f"distributed test {getattr(fn, '__qualname__', fn)} did not finish within "
                        f"{timeout} s (a rank is probably stuck in a collective):\n" + "\n".join(logs)
                    )
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            # The first rank to die is often a *victim* (its collective lost its peer); report every
            # rank's own traceback, root cause included.
            reports = []
            for rank in range(world_size):
                path = os.path.join(out_dir, f"rank{rank}.err")
                if os.path.exists(path):
                    with open(path) as f:
                        text = f.read().rstrip()
                    # the exception's own line first: a long traceback is cut in CI's summary
                    reports.append(f"---- rank {rank}: {text.splitlines()[-1] if text else ''}\n{text}")
                log = _tail(os.path.join(out_dir, f"rank{rank}.log"))
                if log:
                    reports.append(f"---- rank {rank} stderr (last 4000 characters) ----\n{log}")
            killed = isinstance(exc, mp.ProcessExitedException) and exc.signal_name is not None
            if not reports and not killed:
                raise
            raise (RankKilled if killed else RuntimeError)(
                f"distributed test {getattr(fn, '__qualname__', fn)} failed{f' ({exc})' if killed else ''}:\n"
                + "\n".join(reports)
            ) from exc
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            try:
                results.append(torch.load(path, weights_only=False))
            except FileNotFoundError:  # pragma: no cover - join() would have raised
                raise RuntimeError(f"rank {rank} exited without a result:\n{traceback.format_exc()}")
        return results
