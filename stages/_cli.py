"""Shared by the entry points: the one wrapper that turns a user's mistake into `error: ...` and exit 2,
logging set-up, and tqdm bars handed to the library as callbacks."""

from __future__ import annotations

import functools
import logging
import sys

from tqdm import tqdm

from mol.errors import MolError


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def token_bar(total: int, desc: str):
    """A tqdm bar counting tokens (shows tokens/s); returns its update function."""
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True, mininterval=1.0)
    return bar.update


def entry_point(main):
    """Every stage's `main(argv=None) -> int`: logging set up, then a MolError (a config, input, cache
    or run folder the user can fix) is printed as `error: <message>` with exit 2 (a failed stage run
    by `make experiment`: exit 1); anything else is a bug in MoL and keeps its traceback."""

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        setup_logging()
        try:
            return main(argv)
        except MolError as e:
            # through tqdm: a bar still open (the teacher pass's) is cleared first, so the error starts its line
            tqdm.write(f"error: {e}", file=sys.stderr)
            return getattr(e, "exit_code", 2)

    return wrapped
