"""The one base class of every problem a user can fix: a config, an input file, a cache, a run
folder. The entry points (stages/_cli.py) print such an error's message and exit 2; anything else is
a bug in MoL and keeps its traceback."""

from __future__ import annotations


class MolError(Exception):
    """A user's mistake or a refused input, with a message that names the file, field or key."""
