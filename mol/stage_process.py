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


@dataclass(frozen=True)
class StageRun:
    seconds: float                 # wall time of the child
    peak_rss_mb: float             # its peak resident memory (the kernel's ru_maxrss, wait4)
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
    cmd = [sys.executable, "-m", module, *map(str, args)]
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    first = None
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=stage_env(threads_per_process(concurrent)))
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
    return StageRun(seconds=seconds, peak_rss_mb=usage.ru_maxrss / 1024, reached_s=first)
