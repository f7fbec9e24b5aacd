"""Named spans of a pipeline's work, for measuring where its time goes (imports nothing of MoL).

Stage 1 (`mol.teacher.run_teacher_pass`) and its shard writer (`mol.cache.ShardWriter`) take a
`Spans` and open one around each part of their work, by a fixed name (the names are the rows of
`make bench`'s Stage 1 table). The default, `NO_SPANS`, records nothing and costs a no-op context
manager a call; `mol.bench.stage1` passes one that sums wall and CPU seconds per name and thread.
"""

from __future__ import annotations

from contextlib import nullcontext


class Spans:
    """Records nothing: subclass and override `span` (and `tokenizer`) to measure."""

    def span(self, name: str):
        """A context manager around one piece of the work called `name`."""
        return nullcontext()

    def tokenizer(self, tok):
        """The tokenizer the packer is to use: `tok`, or a wrapper that times its calls."""
        return tok


NO_SPANS = Spans()
