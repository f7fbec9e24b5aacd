"""The one way MoL runs a stage as a child process (`python -m stages.X ...`): `make experiment`,
`make qlora` and `make scale` all start their stages here.

Every child gets the same environment: MoL's root on PYTHONPATH (so `-m stages.X` resolves from any
folder), unbuffered output, no progress bars, and a thread count of its own. The thread count is
set for every child, never left to torch: concurrent children each taking torch's default (one
thread a core) oversubscribe the cores, which on a 2-core machine dropped every run to 1-4
tokens/s. Its output (stdout and stderr together) goes to one log file; a failure is a
`StageFailed` naming the command, the exit status, the log and the log's last lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import StageFailed

ROOT = Path(__file__).resolve().parents[1]
LOG_TAIL_LINES = 20  # of a failed child's log, in the StageFailed message

# `python -m MODULE ARGS`, writing at its exit (sys.exit and exceptions included) its own peak RSS in
# kB to $MOL_PEAK_RSS_FILE. VmHWM belongs to the memory map the child's exec made; the ru_maxrss of
# wait4 does not: Linux carries the parent's high-water mark into the child across fork and exec,
# so under a 1.5 GB parent a 10 MB child read 1.5 GB, and a study's small stage read its runner's size.
_MEASURED = """
import atexit, os, runpy, sys
def _peak():
    try:
        with open("/proc/self/status") as f:
            kb = next(line for line in f if line.startswith("VmHWM:")).split()[1]
        with open(os.environ["MOL_PEAK_RSS_FILE"], "w") as f:
            f.write(kb)
    except (OSError, StopIteration, KeyError):
        pass
atexit.register(_peak)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class StageRun:
    seconds: float                 # wall time of the child
    peak_rss_mb: float             # its own peak resident memory (VmHWM; see _MEASURED)
    reached_s: Optional[float]     # seconds from its start until `reached()` first held (None: never, or not asked)


def threads_per_process(concurrent: int = 1) -> int:
    """The cores split between `concurrent` children running at once (at least one thread each)."""
    return max(1, (os.cpu_count() or 1) // max(concurrent, 1))


def stage_env(threads: int) -> dict:
    """The environment of every stage child: this one's, plus the settings above."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_stage(module: str, args: list[str], log_path: Path, *, concurrent: int = 1,
              reached: Callable[[], bool] | None = None) -> StageRun:
    """Run `python -m module args` to its end, its output in `log_path`, with the cores split between
    `concurrent` such children; `reached` (if given) is polled while it runs, for `StageRun.reached_s`.
    Raises StageFailed (command, status, log tail) when it exits non-zero."""
    cmd = [sys.executable, "-m", module, *map(str, args)]  # what it runs, as the messages say it
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    peak_file = log_path.with_name(log_path.name + ".peak-rss")
    peak_file.unlink(missing_ok=True)
    env = {**stage_env(threads_per_process(concurrent)), "MOL_PEAK_RSS_FILE": str(peak_file)}
    t0 = time.monotonic()
    first = None
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _MEASURED, module, *map(str, args)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, 0 if reached is None else os.WNOHANG)
            if pid:
                break
            if first is None and reached():
                first = time.monotonic() - t0
            time.sleep(0.02)
    seconds = time.monotonic() - t0
    proc.returncode = rc = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if rc != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-LOG_TAIL_LINES:])
        raise StageFailed(f"{' '.join(cmd)} exited {rc}; log {log_path}:\n{tail}")
    try:
        peak_kb = int(peak_file.read_text())
        peak_file.unlink()
    except (OSError, ValueError):  # no /proc (not Linux): the kernel's figure, an upper bound
        peak_kb = usage.ru_maxrss
    return StageRun(seconds=seconds, peak_rss_mb=peak_kb / 1024, reached_s=first)
