"""Stage 2: train the student from the teacher cache (MoL or CE-only).

    python -m stages.train data/default.yaml [key=value ...]
e.g. train.alpha=0.5, train.general_ratio=2, train.mode=ce, train.resume=true train.run_name=NAME

Several processes (one per GPU; DDP, the global batch split across them):
    accelerate launch --multi_gpu --num_processes 8 -m stages.train CONFIG [key=value ...]
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from mol.config import parse_cli
from mol.run_folder import OUTPUTS
from mol.train import train
from stages._cli import entry_point


def _step_bar(total: int, desc: str):
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
    return bar.update


@entry_point
def main(argv=None) -> int:
    cfg, _ = parse_cli(sys.argv[1:] if argv is None else argv, __doc__)
    run_dir = train(cfg, make_bar=_step_bar)
    print(f"\nrun folder:  {run_dir}")
    for name in OUTPUTS:
        if (run_dir / name).exists():
            print(f"  {name:14s} {run_dir / name}")
    print(f"next: make eval RUN={run_dir}   make plots RUN={run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
