"""Resolve the config's base model to a local folder (converting the default GGUF once)."""

from __future__ import annotations

import sys

from mol.config import parse_cli
from mol.model import resolve_model_path
from stages._cli import entry_point


@entry_point
def main(argv=None) -> int:
    cfg, _ = parse_cli(sys.argv[1:] if argv is None else argv, __doc__)
    print(f"model ready: {resolve_model_path(cfg.model.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
