"""Shared by the entry points: logging set-up and tqdm bars handed to the library as callbacks."""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def token_bar(total: int, desc: str):
    """A tqdm bar counting tokens (shows tokens/s); returns its update function."""
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True, mininterval=1.0)
    return bar.update
