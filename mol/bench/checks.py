"""What the cache's integrity checks cost: `cache_info --verify` with and without reading every
value, and the trainer's streaming reader with and without its per-row-group checks and its
first-read sha256, measured side by side (interleaved rounds) on one cache."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq

from .. import cache as C
from .stage2 import reader_pass
from .timing import interleaved, med

log = logging.getLogger(__name__)


def decode_every_shard(cache_dir: Path) -> None:
    """What verify's value checks need before they can run: every shard read and decoded into rows,
    on the same thread pool verify uses, with no check at all (the floor of a full verify)."""
    cache = C.TeacherCache(cache_dir)
    jobs = [(u, s) for u in cache.units for s in u.shards]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(lambda us: C.sequences_from_tables([pq.read_table(us[0].path / us[1]["file"])], us[0].path,
                                                         us[0].k), jobs))


def checks_cost(cache_dir: Path, k: int, micro_batch: int, reps: int, warmup: int,
                max_cache_bytes: int = 256 << 20) -> dict:
    """Interleaved: verify with every check (sha256, footers, every value: what cache_info runs),
    without the value checks (sha256 and footers: verify before issue 23), every shard decoded with
    no check (the floor of a full verify), and the reader's pass over
    the train split with no checks, with the value checks, and with the value checks and the sha256
    of each shard on first read (what Stage 2 runs). Fresh TeacherCache objects each round, so each
    round hashes every shard it reads again. Returns the times and the ratios."""
    tokens = []

    def reader(**flags):
        def run():
            tokens.append(reader_pass(cache_dir, k, micro_batch, max_cache_bytes, **flags))
        return run

    t = interleaved({
        "verify_full": lambda: C.TeacherCache(cache_dir).verify(),
        "verify_no_values": lambda: C.TeacherCache(cache_dir).verify(contents=False),
        "decode_every_shard": lambda: decode_every_shard(cache_dir),
        "reader_plain": reader(check_values=False, check_sha256=False),
        "reader_values": reader(check_values=True, check_sha256=False),
        "reader_all": reader(check_values=True, check_sha256=True),
    }, reps, warmup)
    cache = C.TeacherCache(cache_dir)
    out = {"times": t, "tokens": cache.totals["tokens"], "shards": cache.shard_count, "reader_tokens": tokens[-1],
           "bytes": cache.totals["bytes"],
           "verify_ratio": med(t["verify_full"]) / med(t["verify_no_values"]),
           "verify_vs_decode_ratio": med(t["verify_full"]) / med(t["decode_every_shard"]),
           "reader_values_ratio": med(t["reader_plain"]) / med(t["reader_values"]),
           "reader_all_ratio": med(t["reader_plain"]) / med(t["reader_all"])}
    log.info("checks: verify with values %.2fx the time of decoding every shard (%.1fx verify without them); "
             "reader with value checks %.3f of its speed without (%.3f with the sha256 too)",
             out["verify_vs_decode_ratio"], out["verify_ratio"], out["reader_values_ratio"], out["reader_all_ratio"])
    return out
