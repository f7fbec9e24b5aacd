"""What the cache's integrity checks cost: `cache_info --verify` with and without reading every
value, and the trainer's streaming reader with and without its per-row-group checks and its
first-read sha256, measured side by side (interleaved rounds) on one cache."""

from __future__ import annotations

import logging
from pathlib import Path

from .. import cache as C
from .stage2 import reader_pass
from .timing import interleaved, med

log = logging.getLogger(__name__)


def checks_cost(cache_dir: Path, k: int, micro_batch: int, reps: int, warmup: int,
                max_cache_bytes: int = 256 << 20) -> dict:
    """Interleaved: verify with every check (sha256, footers, every value: what cache_info runs) and
    without the value checks (sha256 and footers: verify before issue 23), and the reader's pass over
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
        "reader_plain": reader(check_values=False, check_sha256=False),
        "reader_values": reader(check_values=True, check_sha256=False),
        "reader_all": reader(check_values=True, check_sha256=True),
    }, reps, warmup)
    cache = C.TeacherCache(cache_dir)
    out = {"times": t, "tokens": cache.totals["tokens"], "shards": cache.shard_count, "reader_tokens": tokens[-1],
           "bytes": cache.totals["bytes"],
           "verify_ratio": med(t["verify_full"]) / med(t["verify_no_values"]),
           "reader_values_ratio": med(t["reader_plain"]) / med(t["reader_values"]),
           "reader_all_ratio": med(t["reader_plain"]) / med(t["reader_all"])}
    log.info("checks: verify with values %.2fx the time without; reader with value checks %.3f of its speed "
             "without (%.3f with the sha256 too)", out["verify_ratio"], out["reader_values_ratio"],
             out["reader_all_ratio"])
    return out
