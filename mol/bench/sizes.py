"""What each measurement runs on: the full and the --quick sizes, and the --quick config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import MolConfig, config_to_dict, load_config


@dataclass
class BenchSizes:
    """What each measurement runs on. Batch shapes of Stage 1/2 come from the config."""

    reps: int = 4
    """Timed rounds per interleaved comparison (after `warmup` untimed ones)."""
    warmup: int = 1
    scale_reps: int = 2
    """Rounds per point of the scaling tables (already warm)."""
    storage_sequences: int = 16
    """Real sequences labelled for the storage study (half domain, half general where possible)."""
    loss_tokens: int = 8192
    loss_vocab: int = 151936
    loss_hidden: int = 128
    loss_seq_len: int = 1024
    """Sequence length of the synthetic loss-path batches (tokens = batch x this)."""
    scale_seq_lens: tuple = (128, 256, 512, 1024)
    scale_batch: int = 4
    scale_seq_vocab: int = 49152
    """Vocabulary of the sequence-length sweep (the default model's)."""
    scale_vocabs: tuple = (32768, 65536, 151936)
    scale_vocab_seq_len: int = 256
    step_seq_lens: tuple = (128, 256, 512, 1024)
    """Real-model MoL/CE step ratio at batch 1 and these lengths."""
    memory_fraction: float = 0.55
    """A naive-loss child runs only when its predicted peak is below this share of MemAvailable."""
    parallel_children: int = 1
    pipeline_tokens: int = 2_000_000
    """Tokens of the synthetic corpus the whole Stage 1 runs over with a stub teacher."""
    rss_tokens: int = 500_000
    """Stage 1 peak memory: the stub pass over this many tokens and over 10x as many."""
    pipeline_seq_len: int = 2048
    pipeline_rows_per_shard: int = 64
    zstd_levels: tuple = (1, 3, 5, 6, 7, 9, 12, 19)
    """Levels of the zstd table (the config's own level is added when missing)."""
    threads: Optional[int] = None
    """torch threads in the children (run_all sets it to the parent's)."""
    quick: bool = False


FULL = BenchSizes()
# quick: the headline point doubles as a scaling point, so 6 loss children in all
QUICK = BenchSizes(reps=2, warmup=1, scale_reps=1, storage_sequences=2, loss_tokens=32, loss_vocab=8192,
                   loss_hidden=64, loss_seq_len=32, scale_seq_lens=(32, 64), scale_batch=1, scale_seq_vocab=4096,
                   scale_vocabs=(4096, 8192), scale_vocab_seq_len=32, step_seq_lens=(16, 32),
                   parallel_children=2, pipeline_tokens=20_000, rss_tokens=3_000, quick=True)


def quick_config(cfg: MolConfig, cache_root: Path) -> MolConfig:
    """Tiny sizes for --quick: short sequences, a few records, a private cache folder."""
    d = config_to_dict(cfg)
    d["data"]["max_seq_len"] = 32
    d["data"]["max_train_sequences"] = 4
    d["data"]["max_val_sequences"] = 1
    for s in d["data"]["sources"]:
        s["max_records"] = 40
        s["max_train_sequences"] = 4
        s["max_val_sequences"] = 1
    d["teacher"].update(batch_size=2, rows_per_shard=8, fidelity_sequences=1, cache_root=str(cache_root))
    d["train"]["micro_batch"] = 2
    d["train"]["global_batch"] = 2
    d["train"]["loss_chunk"] = 32
    return load_config(data=d)
