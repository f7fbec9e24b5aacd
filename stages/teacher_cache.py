"""Stage 1: run the base model once over the corpora and cache its top-k soft labels, one cache
unit per source (units another config already built are reused, not labelled again).

    python -m stages.teacher_cache data/default.yaml [key=value ...]

Sharded over N processes (one per GPU or node; each resumes on its own; the (unit, segment) items
are dealt out j % N, so a large source is split between workers):
    python -m stages.teacher_cache CONFIG teacher.num_workers=N teacher.worker_index=I   # I = 0..N-1
    python -m stages.teacher_cache CONFIG teacher.num_workers=N --finalize               # once, after all
"""

from __future__ import annotations

import sys

from mol.cache import TeacherCache
from mol.cache.inspect import describe
from mol.config import check_path, parse_cli
from mol.teacher import finalize_cache, run_teacher_pass
from stages._cli import entry_point, token_bar


@entry_point
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    finalize = "--finalize" in argv
    argv = [a for a in argv if a != "--finalize"]
    cfg, _ = parse_cli(argv, __doc__)
    check_path(cfg.teacher.cache_root, "teacher.cache_root")
    if finalize:
        cache_dir, status = finalize_cache(cfg)
    else:
        cache_dir, status = run_teacher_pass(cfg, make_bar=token_bar)
    if status == "worker-done":
        print(f"\nworker {cfg.teacher.worker_index} of {cfg.teacher.num_workers} done: {cache_dir}\n"
              f"when every worker is done: python -m stages.teacher_cache CONFIG "
              f"teacher.num_workers={cfg.teacher.num_workers} --finalize")
        return 0
    print(f"\nteacher cache {status}: {cache_dir}")
    print(describe(TeacherCache(cache_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
