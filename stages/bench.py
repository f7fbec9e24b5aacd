"""Benchmark: every cost of the pipeline as a ratio against its floor, measured in one run.

    python -m stages.bench [--quick] [--out DIR] [--config CONFIG] [--model PATH] [--threads N] [key=value ...]

Prints the report and writes DIR/bench.json and DIR/bench.md (DIR defaults to bench/). The full
run takes about 15 minutes on a 2-core CPU and builds the config's teacher cache first if it
is missing; --quick runs every measurement at tiny sizes in seconds (a smoke test, not figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from tqdm import tqdm

from mol.bench import SECTIONS, json_safe, run_all, to_markdown
from mol.config import ConfigError, check_path, load_config
from stages._cli import entry_point, token_bar

_SECTIONS = len(SECTIONS)


@entry_point
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks that everything runs")
    ap.add_argument("--out", default="bench", help="output folder for bench.json and bench.md (default bench/)")
    ap.add_argument("--config", default="data/default.yaml", help="config naming the model, data and cache")
    ap.add_argument("--model", help="model folder or hub id instead of the config's model.name")
    ap.add_argument("--threads", type=int, help="torch threads per process (default: torch's own choice)")
    args = ap.parse_args(argv)
    command = "python -m stages.bench" + ("".join(" " + shlex.quote(a) for a in argv))
    if os.environ.get("MAKELEVEL"):
        command = f"make bench{' ARGS=' + shlex.quote(' '.join(argv)) if argv else ''}  ({command})"
    overrides = list(args.overrides) + ([f"model.name={args.model}"] if args.model else [])
    cfg = load_config(args.config, overrides)
    if args.threads is not None and args.threads < 1:
        raise ConfigError([f"--threads must be >= 1, got {args.threads}"])
    out = check_path(args.out, "--out")  # before the minutes of measuring, not after
    bar = tqdm(total=_SECTIONS, desc="bench", unit="part", dynamic_ncols=True)
    started = []

    def section(name: str) -> None:
        if started:
            bar.update(1)
        started.append(name)
        bar.set_postfix_str(name)

    res = run_all(cfg, quick=args.quick, threads=args.threads, section=section, make_bar=token_bar)
    bar.update(_SECTIONS - bar.n)
    bar.close()
    res["meta"]["command"] = command
    md = to_markdown(res, command)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(json_safe(res), indent=2) + "\n")
    (out / "bench.md").write_text(md)
    print()
    print(md)
    met = [f["id"] for f in res["figures"] if f["met"]]
    if "skipped" in res["vllm"]:
        print(f"vLLM figures not measured: {res['vllm']['skipped']}")
    print(f"goals met: {len(met)} of {len(res['figures'])}; wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
