"""Inspect and verify a teacher cache.

    python -m stages.cache_info data/default.yaml [key=value ...]   # the cache this config names
    python -m stages.cache_info --path CACHE_DIR                     # any cache folder
Exit status 1 when a checksum, size or row count does not match the manifest.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from mol.cache import CacheError, TeacherCache, resolve_cache_key
from mol.config import ConfigError, load_config
from stages._cli import setup_logging


def describe(cache: TeacherCache) -> str:
    m = cache.manifest
    t, r, key = m["totals"], m["residual"], m["key"]
    lines = [
        f"cache        {cache.path}",
        f"model        {m['model']['name']}  (fingerprint {key['model_fingerprint'][:12]}, vocab {m['model']['vocab_size']})",
        f"k            {key['top_k']}   label_domain={key['label_domain']}   max_seq_len={key['packing']['max_seq_len']}",
        f"sequences    {t['sequences']}   tokens {t['tokens']}   shards {len(m['shards'])}",
        f"bytes        {t['bytes']}   ({t['bytes_per_token']:.1f} bytes/token)",
        f"residual r0  mean {r['mean']:.4f}  median {r['median']:.4f}  p90 {r['p90']:.4f}  p99 {r['p99']:.4f}",
    ]
    if m.get("run", {}).get("teacher_tokens_per_s"):
        lines.append(f"teacher      {m['run']['teacher_tokens_per_s']:.0f} tokens/s on {m['run']['device']} ({m['run']['dtype']})")
    f = m.get("fidelity") or {}
    if f:
        lines.append(f"fidelity     mean |KL_cached - KL_exact| = {f['kl_quantisation_mean_abs']:.2e} nats/token "
                     f"(max {f['kl_quantisation_max_abs']:.1e}); vs dense full-vocab KL {f['kl_truncation_mean_abs']:.2e} "
                     f"(dense KL {f['kl_dense_mean']:.3f}); {f['positions']} positions, probe: {f['probe']}")
    lines.append("counts       " + "  ".join(f"{k}={v['sequences']}" for k, v in sorted(m["counts"].items())))
    return "\n".join(lines)


def main(argv=None) -> int:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="YAML config naming the cache")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--path", help="a cache folder (instead of a config)")
    ap.add_argument("--no-verify", action="store_true", help="skip the checksums")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.path:
            path = args.path
        elif args.config:
            path = resolve_cache_key(load_config(args.config, args.overrides)).cache_dir
        else:
            ap.error("give a CONFIG or --path")
        cache = TeacherCache(path)
        print(describe(cache))
        if not args.no_verify:
            bar = tqdm(total=len(cache.manifest["shards"]), desc="verify", unit="shard")
            problems = cache.verify(progress=bar.update)
            bar.close()
            if problems:
                print("VERIFY FAILED:\n  " + "\n  ".join(problems))
                return 1
            print(f"verify       ok: {len(cache.manifest['shards'])} shards match their sha256 and row counts")
    except (ConfigError, CacheError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
