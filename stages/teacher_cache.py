"""Stage 1: run the base model once over the corpora and cache its top-k soft labels.

    python -m stages.teacher_cache data/default.yaml [key=value ...]
"""

from __future__ import annotations

import sys

from mol.config import ConfigError, parse_cli
from mol.corpora import CorpusError
from mol.cache import CacheError, TeacherCache
from mol.teacher import run_teacher_pass
from stages._cli import setup_logging, token_bar
from stages.cache_info import describe


def main(argv=None) -> int:
    setup_logging()
    try:
        cfg, _ = parse_cli(sys.argv[1:] if argv is None else argv, __doc__)
        cache_dir, status = run_teacher_pass(cfg, make_bar=token_bar)
    except (ConfigError, CorpusError, CacheError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nteacher cache {status}: {cache_dir}")
    print(describe(TeacherCache(cache_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
