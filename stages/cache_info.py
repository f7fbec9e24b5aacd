"""Inspect, verify and clean teacher caches.

    python -m stages.cache_info data/default.yaml [key=value ...]   # the cache this config names, verified
    python -m stages.cache_info --path DIR                           # a set folder or one unit folder
    python -m stages.cache_info --list [CONFIG | --root DIR]         # every unit under a cache_root
    python -m stages.cache_info --gc CONFIG [CONFIG ...] [--yes]     # remove units none of them uses
Exit status 1 when a checksum, size, schema or row count does not match a manifest; 2 for bad input.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from mol.cache import SETS_DIR, UNITS_DIR, CacheError, CacheUnit, TeacherCache, resolve_cache_key, sets_using
from mol.config import check_path, expand_path, load_config, mol_home
from mol.files import try_lock
from stages._cli import entry_point


def describe(cache: TeacherCache) -> str:
    m = cache.manifest
    t, r, key = cache.totals, m["residual"], cache.key
    lines = [
        f"cache        {cache.path}",
        f"model        {m['model']['name']}  (fingerprint {key['model_fingerprint'][:12]}, vocab {cache.vocab_size})",
        f"k            {cache.k}   label_domain={cache.label_domain}   max_seq_len={key['packing']['max_seq_len']}",
        f"sequences    {t['sequences']}   tokens {t['tokens']}   units {len(cache.units)}   shards {cache.shard_count}",
        f"bytes        {t['bytes']}   ({t['bytes_per_token']:.1f} bytes/token)",
    ]
    if r.get("positions"):
        lines.append(f"residual r0  mean {r['mean']:.4f}  median {r['median']:.4f}  p90 {r['p90']:.4f}  p99 {r['p99']:.4f}"
                     f"  (below 1e-30: {r.get('below_1e-30', 0)} of {r['positions']}; fp16 would store "
                     f"{r.get('fp16_would_be_zero', 0)} zeros, {r.get('fp16_would_be_subnormal', 0)} subnormals)")
    if m.get("run", {}).get("teacher_tokens_per_s"):
        lines.append(f"teacher      {m['run']['teacher_tokens_per_s']:.0f} tokens/s on {m['run']['device']}")
    f = m.get("fidelity") or {}
    if f:
        lines.append(f"fidelity     mean |KL_cached - KL_exact| = {f['kl_quantisation_mean_abs']:.2e} nats/token "
                     f"(max {f['kl_quantisation_max_abs']:.1e}); vs dense full-vocab KL {f['kl_truncation_mean_abs']:.2e} "
                     f"(dense KL {f['kl_dense_mean']:.3f}); {f['positions']} positions, probe: {f['probe']}")
    lines.append("counts       " + "  ".join(f"{k}={v['sequences']}" for k, v in sorted(m["counts"].items())))
    for u in m["units"]:
        p = u.get("this_pass") or {}
        lines.append(f"unit         {u['dir']}  {u['corpus']}/{u['subset']}  {u['tokens']} tokens  "
                     f"{u['bytes'] / max(u['tokens'], 1):.1f} B/token" + (f"  [{p['status']}, {p['labelled_tokens']} tokens labelled]"
                                                                        if p else ""))
    return "\n".join(lines)


def describe_unit(unit: CacheUnit) -> str:
    m = unit.manifest
    t, src = unit.totals, unit.source
    return "\n".join([
        f"unit         {unit.path}",
        f"source       {src['corpus']}/{src['subset']}  {m['source']['path']}  sha256 {src['sha256'][:12]}",
        f"model        {m['model']['name']}  (fingerprint {unit.key['model_fingerprint'][:12]})  k {unit.k}"
        f"  labelled={unit.labelled}",
        f"sequences    {t['sequences']}   tokens {t['tokens']}   shards {unit.shard_count}   segments {m.get('segments')}",
        f"bytes        {t['bytes']}   ({t['bytes_per_token']:.1f} bytes/token)",
    ])


def inventory(root: Path) -> str:
    users = sets_using(root)
    rows = [f"{'unit':58} {'source':28} {'tokens':>12} {'bytes':>14} {'B/token':>8}  used by"]
    for d in sorted((root / UNITS_DIR).glob("*")):
        if not d.is_dir():
            continue
        try:
            unit = CacheUnit(d)
            src = f"{unit.corpus}/{unit.subset}"
            t = unit.totals
            rows.append(f"{d.name:58} {src:28} {t['tokens']:>12} {t['bytes']:>14} {t['bytes_per_token']:>8.1f}  "
                        + (", ".join(users.get(d.name, [])) or "-"))
        except CacheError:
            size = sum(p.stat().st_size for p in d.glob("*") if p.is_file())
            rows.append(f"{d.name:58} {'(incomplete)':28} {'?':>12} {size:>14} {'':>8}  " + (", ".join(users.get(d.name, [])) or "-"))
    return "\n".join(rows)


def _locked(folder: Path) -> int | None:
    """Take the folder's lock, the one every teacher pass, worker and finalize takes: the
    descriptor, or None while one of them holds it. Kept until the folder is gone, so a pass
    starting meanwhile is refused instead of writing into a folder being deleted."""
    try:
        return try_lock(folder / ".lock")
    except BlockingIOError:
        return None


def garbage_collect(configs: list[str], yes: bool) -> int:
    cfgs = [load_config(c) for c in configs]
    roots = {expand_path(c.teacher.cache_root) for c in cfgs}
    keep = set()
    for c in cfgs:
        rk = resolve_cache_key(c)
        keep |= {u.dir.name for u in rk.units} | {rk.cache_dir.name}
    freed = 0
    for root in sorted(roots):
        for kind in (UNITS_DIR, SETS_DIR):
            for d in sorted((root / kind).glob("*")):
                if not d.is_dir() or d.name in keep:
                    continue
                fd = _locked(d)
                if fd is None:
                    print(f"skip   {d} (a teacher pass holds its lock)")
                    continue
                try:
                    size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
                    freed += size
                    print(f"{'remove' if yes else 'would remove'} {d}  ({size / 1e6:.1f} MB)")
                    if yes:
                        # Renamed first, under the lock: rmtree unlinks .lock before the folder is
                        # gone, and a pass starting then would lock a new .lock inside it. After the
                        # rename a pass starts a fresh folder; a gc killed mid-delete leaves a .gc-*
                        # folder (the next gc removes it), never a half unit under its own name.
                        doomed = d if d.name.startswith(".gc-") else d.with_name(f".gc-{d.name}-{os.getpid()}")
                        os.rename(d, doomed)
                        shutil.rmtree(doomed)
                finally:
                    os.close(fd)
    print(f"{'freed' if yes else 'would free'} {freed / 1e6:.1f} MB" + ("" if yes else "; run again with --yes to remove"))
    return 0


@entry_point
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="YAML config naming the cache")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--path", help="a set folder or a unit folder (instead of a config)")
    ap.add_argument("--no-verify", action="store_true", help="skip the checksums")
    ap.add_argument("--list", action="store_true", help="list every unit under the cache root")
    ap.add_argument("--root", help="the cache root for --list (default: the config's, else $MOL_HOME/teacher)")
    ap.add_argument("--gc", nargs="+", metavar="CONFIG", help="remove units none of these configs uses")
    ap.add_argument("--yes", action="store_true", help="with --gc: really remove (default: dry run)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    if args.gc:
        return garbage_collect(args.gc + ([args.config] if args.config else []), args.yes)
    if args.list:
        root = (check_path(args.root, "--root", must_exist=True) if args.root
                else expand_path(load_config(args.config, args.overrides).teacher.cache_root) if args.config
                else mol_home() / "teacher")
        print(inventory(root))
        return 0
    if args.path:
        path = check_path(args.path, "--path", must_exist=True)
    elif args.config:
        path = resolve_cache_key(load_config(args.config, args.overrides)).cache_dir
    else:
        ap.error("give a CONFIG, --path, --list or --gc")
    if path.parent.name == UNITS_DIR:
        cache = CacheUnit(path)
        print(describe_unit(cache))
    else:
        cache = TeacherCache(path)
        print(describe(cache))
    count = cache.shard_count
    if not args.no_verify:
        bar = tqdm(total=count, desc="verify", unit="shard")
        problems = cache.verify(progress=bar.update)
        bar.close()
        if problems:
            print("VERIFY FAILED:\n  " + "\n  ".join(problems))
            return 1
        print(f"verify       ok: {count} shards match their sha256, schema and row counts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
