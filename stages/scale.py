"""`make scale`: Stage 1 and Stage 2 end to end at 1M, 10M and 30M tokens (tiny model, synthetic
corpora); peak RSS, time to the first step, tokens/s and disk bytes/token per size.

    python -m stages.scale [--sizes 1M,10M,30M] [--work DIR] [--out DIR]

Writes OUT/scale.md and OUT/scale.json (OUT defaults to bench/); WORK (default
$MOL_HOME/scale) keeps the corpora, model and caches, so a second run reuses the corpora.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from mol.cache import CacheError, resolve_cache_key
from mol.config import ConfigError, check_path, load_config, mol_home
from mol.machine import machine_info
from mol.scale import SIZES, paper_table, run_scale, to_markdown, wide_vocab_storage
from stages._cli import entry_point


def _tokens(s: str) -> int:
    """`30M`, `500K` or `1000000` as a positive token count; ValueError otherwise."""
    s = s.strip().upper()
    n = int(float(s[:-1] if s[-1:] in ("K", "M") else s) * {"K": 1_000, "M": 1_000_000}.get(s[-1:], 1))
    if n < 1:
        raise ValueError(s)
    return n


@entry_point
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma-separated token counts, e.g. 1M,10M,30M")
    ap.add_argument("--work", default=str(mol_home() / "scale"))
    ap.add_argument("--out", default="bench")
    args = ap.parse_args(argv)
    try:
        sizes = {s.strip(): _tokens(s) for s in args.sizes.split(",")}
    except (ValueError, OverflowError):
        raise ConfigError([f"--sizes {args.sizes!r}: give positive token counts such as 1M,10M,30M"]) from None
    work = check_path(args.work, "--work")
    out = check_path(args.out, "--out")
    command = "python -m stages.scale" + "".join(" " + shlex.quote(a) for a in argv)
    if os.environ.get("MAKELEVEL"):
        command = f"make scale  ({command})"
    res = run_scale(work, sizes, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    try:  # the paper-scale table re-encodes the default cache's real labels over Qwen3's vocabulary
        default = resolve_cache_key(load_config("data/default.yaml")).cache_dir
        storage = wide_vocab_storage(default)
        res["paper"] = paper_table(res, storage, res["reader"]["tokens_per_s"])
        res["wide_vocab_storage"] = storage
    except (CacheError, FileNotFoundError) as e:
        print(f"paper-scale table skipped: no default cache ({e}); run `make teacher-cache` first", file=sys.stderr)
    info = machine_info()
    machine = f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores, torch {info.get('torch', '?')}"
    md = to_markdown(res, command, machine)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({**res, "command": command, "machine": info}, indent=2) + "\n")
    (out / "scale.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
