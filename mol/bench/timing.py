"""Timing and memory primitives, and the fresh child processes peak memory is measured in.

Absolute timings mean little on a shared machine, so every timed figure is a ratio of variants
run in the same process, interleaved round by round (:func:`interleaved`: the order rotates each
round so drift hits every variant alike), median against median. Peak memory is measured per
variant in a fresh child process (:func:`run_children`): the kernel's RSS high-water mark is
reset right before the work (so imports and model loading never count), and the figure is
``ru_maxrss`` after the work minus the RSS before (:func:`measure_peak`).

A child runs the work that a module registered under its spec's "kind" with :func:`child_setup`.
"""

from __future__ import annotations

import gc
import multiprocessing
import resource
import statistics
import sys
import time
import traceback
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import torch


def _sync() -> None:
    """Wait for queued GPU work: CUDA calls return before the kernels finish, so a clock read right
    after them would time the launch, not the work (a no-op on CPU and before CUDA is first used)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(tasks: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every task once per round for warmup + reps rounds; wall seconds of the timed rounds.

    A task may return a dict of its own sub-timings (seconds); they are kept as "name/key".
    """
    names = list(tasks)
    out: dict[str, list[float]] = defaultdict(list)
    for r in range(warmup + reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            gc.collect()
            _sync()
            t0 = time.perf_counter()
            res = tasks[name]()
            _sync()
            dt = time.perf_counter() - t0
            if r >= warmup:
                out[name].append(dt)
                if isinstance(res, dict):
                    for key, v in res.items():
                        out[f"{name}/{key}"].append(float(v))
    return dict(out)


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _status_bytes(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rss_bytes() -> int:
    rss = _status_bytes("VmRSS")
    return _maxrss_bytes() if rss is None else rss


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # Linux reports KiB


def _reset_peak() -> bool:
    # Linux >= 4.0: "5" resets the mm's RSS high-water mark, which ru_maxrss reads, so the peak
    # that follows belongs to the measured work and not to imports or model loading.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak(work: Callable[[], Any]) -> dict:
    """The work's own peak RSS: the high-water mark after it minus the RSS right before it.

    The high-water mark is ru_maxrss, except that a child started by fork/vfork + exec inherits
    in ru_maxrss the RSS its parent had at the fork (the kernel folds the old mm's peak into the
    signal struct at exec), which the reset cannot clear; the mm's own mark, VmHWM, is what the
    reset clears, so it is used whenever the reset worked.
    """
    gc.collect()
    reset = _reset_peak()
    before = _rss_bytes()
    t0 = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - t0
    ru = _maxrss_bytes()
    hwm = _status_bytes("VmHWM")
    peak = hwm if reset and hwm is not None else ru
    out = {"peak_bytes": max(peak - before, 0), "rss_before_bytes": before, "high_water_bytes": peak,
           "ru_maxrss_bytes": ru, "peak_reset": reset, "seconds": seconds}
    if result is not None:  # what the work reports about itself (a JSON-able dict)
        out["result"] = result
    return out


_Setup = Callable[..., Callable[[], Any]]
_CHILD_SETUPS: dict[str, _Setup] = {}


def child_setup(kind: str) -> Callable[[_Setup], _Setup]:
    """Register the decorated function as the setup of children of this kind: called in the child
    with the spec's args, it returns the work whose peak is measured.

    The modules that define setups register them when imported; importing mol.bench imports them
    all, and the forkserver does that before it forks any child (see _context)."""
    def register(setup: _Setup) -> _Setup:
        _CHILD_SETUPS[kind] = setup
        return setup

    return register


def _child_entry(spec: dict, conn) -> None:
    try:
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        work = _CHILD_SETUPS[spec["kind"]](**spec["args"])
        conn.send(("ok", measure_peak(work)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _context():
    # forkserver: every child is forked from a server that has only imported these modules and
    # never run a torch op (so no OpenMP pool exists at the fork), which makes a child fresh, with
    # its own peak, for a few ms instead of the seconds that importing torch/transformers takes;
    # the package mol.bench, not just this module, so that every child setup is registered
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["mol.bench", "mol.train", "transformers", "peft"])
    return ctx


def run_children(specs: list[dict], parallel: int = 1, threads: Optional[int] = None,
                 timeout: float = 900) -> list[dict]:
    """Run each spec ({"kind", "args"}) in its own fresh process; measure_peak results in order."""
    ctx = _context()

    def one(spec):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child_entry, args=({**spec, "threads": threads}, send), daemon=True)
        proc.start()
        send.close()
        try:
            if not recv.poll(timeout):
                proc.kill()
                raise RuntimeError(f"benchmark child {spec['kind']} {spec['args']}: no result in {timeout:.0f} s")
            status, payload = recv.recv()
        except EOFError:
            proc.join()
            raise RuntimeError(f"benchmark child {spec['kind']} {spec['args']} died (exit code {proc.exitcode}; "
                               f"killed for memory?)") from None
        finally:
            recv.close()
        proc.join()
        if status != "ok":
            raise RuntimeError(f"benchmark child {spec['kind']} {spec['args']} failed:\n{payload}")
        return payload

    if parallel > 1:
        with ThreadPoolExecutor(parallel) as ex:
            return list(ex.map(one, specs))
    return [one(x) for x in specs]
