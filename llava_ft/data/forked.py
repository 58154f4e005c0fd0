"""Forked worker processes that hand back one result each and end with their parent, even when it is killed -9.

Preparation forks its workers (they inherit the loaded tokenizer, the parsed records) rather than spawning
them. A worker asks the kernel to kill it when its parent dies (Linux: prctl PR_SET_PDEATHSIG), elsewhere
it polls the parent's pid; either way a parent that died before the worker was set up is seen at once.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.5

Progress = Callable[[int], None]
Job = Callable[[Progress], object]


def die_with_parent(parent: int) -> None:
    """In a forked child of `parent`: end this process when `parent` ends. On Linux the kill comes when the
    thread that forked this process ends: forking threads here are the callers' own, which outlive the
    workers they wait for."""
    if not (sys.platform.startswith("linux") and _set_pdeathsig()):
        threading.Thread(target=_watch, args=(parent,), daemon=True, name="parent-watch").start()
    if os.getppid() != parent:  # died between the fork and the line above: this process was handed on
        os._exit(1)


def _set_pdeathsig() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    os._exit(1)


@dataclass
class _Failure:
    traceback: str


def _child(job: Job, writer, counter, parent: int) -> None:
    die_with_parent(parent)

    def progress(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    try:
        outcome: object = job(progress)
    except BaseException:  # noqa: BLE001 - handed to the parent, which raises it
        outcome = _Failure(traceback.format_exc())
    writer.send(outcome)
    writer.close()


def run_forked(jobs: list[Job], *, what: str, progress: Progress | None = None) -> list[object]:
    """Each job(progress) run in a forked process, its result returned in job order. `progress` gets the total
    the jobs have reported so far, while they run. A job that raises or a process that dies raises
    RuntimeError naming `what`; the other processes are then killed."""
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    parent = os.getpid()
    procs, readers = [], []
    finished = False
    try:
        for job in jobs:
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(job, writer, counter, parent), daemon=True)
            proc.start()
            writer.close()  # the child's copy is the only writer: its death reads as end of file here
            procs.append(proc)
            readers.append(reader)
        results = []
        for proc, reader in zip(procs, readers):
            while not reader.poll(0.2):
                if progress is not None:
                    progress(counter.value)
            try:
                outcome = reader.recv()
            except EOFError:
                proc.join()
                raise RuntimeError(f"{what} process {proc.name} died (exit code {proc.exitcode})") from None
            if isinstance(outcome, _Failure):
                raise RuntimeError(f"{what} process {proc.name} failed:\n{outcome.traceback}")
            results.append(outcome)
        if progress is not None:
            progress(counter.value)
        finished = True
        return results
    finally:
        for proc in procs:
            if not finished:  # an error or an interrupt here: the others' work is wasted
                proc.kill()
            proc.join()
        for reader in readers:
            reader.close()
