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


def _torch_threads() -> int | None:
    """torch's thread count, or None while torch is not imported (a stage that never imports it
    does not pay for the import)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def token_bar(total: int, desc: str):
    """A tqdm bar counting tokens (shows tokens/s); returns its update function."""
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True, mininterval=1.0)
    return bar.update


def entry_point(main):
    """Every stage's `main(argv=None) -> int`: logging set up, then a MolError (a config, input, cache
    or run folder the user can fix) is printed as `error: <message>` with exit 2 (a failed stage run
    by `make experiment`: exit 1); anything else is a bug in MoL and keeps its traceback.

    A main() called in-process (as the tests call them) leaves torch's thread count
    as it found it, whatever its options set."""

    @functools.wraps(main)
    def wrapped(argv=None) -> int:
        setup_logging()
        threads = _torch_threads()
        try:
            return main(argv)
        except MolError as e:
            # through tqdm: a bar still open (the teacher pass's) is cleared first, so the error starts its line
            tqdm.write(f"error: {e}", file=sys.stderr)
            return getattr(e, "exit_code", 2)
        finally:
            if threads is not None:
                sys.modules["torch"].set_num_threads(threads)

    return wrapped
