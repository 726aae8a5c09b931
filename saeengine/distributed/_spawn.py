"""Run a function on P local processes joined by gloo (tests, CPU benchmarks).

``run(fn, world_size, *args)`` starts ``world_size`` processes with the "spawn" start
method (no fork: the parent's OpenMP and torch threads do not survive a fork), joins
them in a gloo process group over 127.0.0.1 (one free port), calls ``fn(rank,
world_size, *args)`` in each and returns the ranks' return values in rank order. An
exception in any rank is re-raised in the parent as :class:`SpawnError` carrying every
failing rank's traceback; a rank that does not answer within ``timeout`` seconds gets
the whole group killed (by process id) and a SpawnError. ``fn`` and its arguments must
be picklable (a module-level function of an importable module).

Each process runs with one torch thread (``threads``): P processes on a few shared cores.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback


class SpawnError(RuntimeError):
    """One or more spawned ranks failed; ``failures`` maps rank -> traceback text."""

    def __init__(self, message: str, failures: dict[int, str] | None = None):
        super().__init__(message)
        self.failures = failures or {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world_size, port, fn, args, results, threads, collective_timeout, init):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    try:
        if init:
            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=collective_timeout))
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException as err:  # report every failure to the parent, then leave
        results.put((rank, False, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        if init and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run(fn, world_size: int, *args, timeout: float = 120.0, threads: int = 1, collective_timeout: float = 60.0,
        init: bool = True) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo processes -> their results.

    ``init=False`` leaves torch.distributed uninitialized in the children (with the
    MASTER_ADDR/PORT, RANK, WORLD_SIZE environment torchrun would set), for code that
    initializes it itself (saeengine.distributed.init_mesh)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(rank, world_size, port, fn, args, results, threads,
                                              collective_timeout, init), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    answers: dict[int, tuple[bool, object]] = {}
    try:
        while len(answers) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(answers))
                raise SpawnError(f"ranks {missing} gave no answer within {timeout:.0f} s (hung collective?)",
                                 {r: str(v) for r, (ok, v) in answers.items() if not ok})
            answers[rank] = (ok, value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()  # only our own children, by their process object
                p.join()
    failures = {r: v for r, (ok, v) in answers.items() if not ok}
    if failures:
        first = min(failures)
        raise SpawnError(f"ranks {sorted(failures)} failed; rank {first}: {failures[first]}", failures)
    return [answers[r][1] for r in range(world_size)]
