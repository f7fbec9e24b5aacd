"""Inspect, verify and clean teacher caches.

    python -m stages.cache_info data/default.yaml [key=value ...]   # the cache this config names, verified
    python -m stages.cache_info --path DIR                           # a set folder or one unit folder
    python -m stages.cache_info --list [CONFIG | --root DIR]         # every unit under a cache_root
    python -m stages.cache_info --gc CONFIG [CONFIG ...] [--yes]     # remove units none of them uses
Exit status 1 when a checksum, size, schema or row count does not match a manifest; 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from mol.cache import resolve_cache_key
from mol.cache.inspect import garbage_collect, inventory, open_folder, summary, verify_report
from mol.config import check_path, expand_path, load_config, mol_home
from stages._cli import entry_point


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
    cache = open_folder(path)
    print(summary(cache))
    if not args.no_verify:
        bar = tqdm(total=cache.shard_count, desc="verify", unit="shard")
        ok, report = verify_report(cache, progress=bar.update)
        bar.close()
        print(report)
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
