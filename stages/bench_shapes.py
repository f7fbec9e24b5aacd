"""Real-shape benchmark: Qwen3-0.6B/8B-shaped models (random weights, nothing downloaded), bf16 and
nf4, Stage 1 ÷ bare forward, Stage 2 step time and peak memory (MoL, CE-only, online teacher), the
nf4 student with AdamW and adamw8bit, the loss path at seq_len × vocab, time to first step.

    python -m stages.bench_shapes [--shape tiny|qwen3-0.6b|qwen3-8b ...] [--seq-len N] [--out DIR]
                                  [--time-limit S] [--device auto|cpu|cuda|cuda:N] [--threads N]

Writes DIR/shapes.json and DIR/shapes.md (DIR defaults to bench/). Without --shape: qwen3-0.6b and
qwen3-8b where CUDA is available (about 5 minutes on one H100), tiny otherwise (seconds). Each
section fails soft (an OOM is recorded, the next section runs); --time-limit (default 480 s) bounds
the whole run. Needs torch, transformers, peft, accelerate, pyarrow, numpy, pyyaml, tqdm; the nf4
section and adamw8bit need bitsandbytes (without it they record an error). Nothing is installed
at run time; the qwen3-8b model folder takes 16.4 GB of disk under the system temp folder
(TMPDIR) while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import torch
from tqdm import tqdm

from mol.bench.shapes import SECTIONS, SHAPES, run_shapes
from mol.bench.report import json_safe
from mol.bench.shapes_report import to_markdown, twins
from mol.config import ConfigError, check_path
from mol.machine import torch_threads
from stages._cli import entry_point


def _parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", metavar="NAME",
                    help=f"a shape to run, repeatable: {', '.join(SHAPES)} (default: the two Qwen3 shapes on "
                         "CUDA, tiny otherwise)")
    ap.add_argument("--seq-len", type=int, help="tokens per sequence instead of each shape's own (8192 for Qwen3)")
    ap.add_argument("--out", default="bench", help="folder for shapes.json and shapes.md (default bench/)")
    ap.add_argument("--time-limit", type=float, default=480.0, help="seconds for the whole run (default 480)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = ap.parse_args(argv)
    problems = [f"--shape {s!r}: no such shape (choose from {', '.join(SHAPES)})"
                for s in args.shape or [] if s not in SHAPES]
    if args.seq_len is not None and args.seq_len < 2:
        problems.append(f"--seq-len must be >= 2 (a sequence predicts its next tokens), got {args.seq_len}")
    if not args.time_limit > 0:
        problems.append(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    try:
        torch.device(args.device) if args.device != "auto" else None
    except RuntimeError:
        problems.append(f"--device {args.device!r}: not a torch device (auto, cpu, cuda, cuda:N, mps)")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be >= 1, got {args.threads}")
    if problems:
        raise ConfigError(problems)
    return args


def _run(names: list[str], **kw) -> dict:
    """run_shapes with a bar that steps once per section."""
    bar = tqdm(total=len(names) * len(SECTIONS), desc="bench-shapes", unit="part", dynamic_ncols=True)
    started = []

    def section(shape: str, name: str) -> None:
        if started:
            bar.update(1)
        started.append(name)
        bar.set_postfix_str(f"{shape}: {name}")

    res = run_shapes(names, section=section, **kw)
    bar.update(bar.total - bar.n)
    bar.close()
    return res


@entry_point
def main(argv=None) -> int:
    from mol.model import pick_device

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    command = "python -m stages.bench_shapes" + "".join(" " + shlex.quote(a) for a in argv)
    if os.environ.get("MAKELEVEL"):
        command = f"make bench-shapes{' ARGS=' + shlex.quote(' '.join(argv)) if argv else ''}  ({command})"
    device = pick_device(args.device)  # a wrong device is refused before any work (ModelError)
    out = check_path(args.out, "--out")
    names = list(dict.fromkeys(args.shape or (["qwen3-0.6b", "qwen3-8b"] if device.type == "cuda" else ["tiny"])))
    with torch_threads(args.threads):
        res = _run(names, seq_len=args.seq_len, device=str(device), time_limit=args.time_limit)
    res["meta"]["command"] = command
    res["twins"] = {fid: {"measured": v, "still_arithmetic": why} for fid, (v, why) in twins(res).items()}
    md = to_markdown(res, command)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shapes.json").write_text(json.dumps(json_safe(res), indent=2) + "\n")
    (out / "shapes.md").write_text(md)
    print()
    print(md)
    failed = [f"{s}/{n}" for s, r in res["shapes"].items() for n, x in r["sections"].items() if "error" in x or "skipped" in x]
    print(f"{len(failed)} section(s) failed or skipped{': ' + ', '.join(failed) if failed else ''}; "
          f"wrote {out / 'shapes.json'} and {out / 'shapes.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
