"""The one base class of every problem a user can fix: a config, an input file, a cache, a run
folder. The entry points (stages/_cli.py) print such an error's message and exit 2; anything else is
a bug in MoL and keeps its traceback."""

from __future__ import annotations


class MolError(Exception):
    """A user's mistake or a refused input, with a message that names the file, field or key."""


class MissingInput(MolError, FileNotFoundError):
    """A file or folder the config or the command names (or a stage needs) does not exist."""


class BadPath(MolError, OSError):
    """A path of the wrong kind: a file where a folder is due (or under one), a folder where a file is."""


class StageFailed(MolError, RuntimeError):
    """A stage run as a child process (mol/stage_process.py: `make experiment`, `make qlora`,
    `make scale`) failed; the message holds its command and the tail of its log."""

    exit_code = 1  # the stage's own log says whose mistake it was
