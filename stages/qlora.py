"""The 4-bit student against the full-precision one, with and without MoL (issue: QLoRA + MoL).

    python -m stages.qlora [CONFIG] [key=value ...] [--out runs/qlora] [--page docs/qlora]

Three runs of CONFIG (default data/default.yaml): fp32 + MoL, nf4 + MoL, nf4 + CE only; writes
docs/qlora/README.md (table, curves, peak memory). Finished runs are reused.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from mol.config import check_path, load_config
from mol.machine import machine_info
from mol.qlora import run_study
from stages._cli import entry_point


@entry_point
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default="data/default.yaml")
    ap.add_argument("overrides", nargs="*", help="key=value, applied to all three runs")
    ap.add_argument("--out", type=Path, default=Path("runs/qlora"), help="run folders")
    ap.add_argument("--page", type=Path, default=Path("docs/qlora"), help="results page folder")
    args = ap.parse_args(argv)
    load_config(args.config, args.overrides + ["model.quantization=nf4"])  # every problem before any work
    check_path(args.out, "--out")
    check_path(args.page, "--page")
    command = "python -m stages.qlora" + "".join(" " + shlex.quote(a) for a in argv)
    if os.environ.get("MAKELEVEL"):
        command = f"make qlora  ({command})"
    info = machine_info()
    machine = f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores, torch {info.get('torch', '?')}"
    page = run_study(Path(args.config), list(args.overrides), args.out, args.page, command, machine)
    print(page.read_text())
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
