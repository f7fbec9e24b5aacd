"""Both stages stream: their peak memory does not grow with the corpus (the benchmark and
`make scale` measure the ratios at larger sizes; these are the fast guards in `make test`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mol.synthetic import write_corpus

ROOT = Path(__file__).resolve().parents[1]

# A child's own peak RSS: VmHWM belongs to the memory map exec made. Not ru_maxrss: Linux carries the
# parent's high-water mark into it across fork (or vfork) and exec, so under a pytest process of 1.5 GB
# every child read at least 1.5 GB and a growth of the child's own could not show.
PEAK_KB = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"

# One Stage 1 pass with the instant teacher in a fresh process; prints its peak RSS and tokens.
CHILD = """
import json, os, sys
if os.environ.get("MOL_TEST_HOLD_SEQUENCES"):  # proves the test can fail: keep every sequence, as pre-streaming Stage 1 did
    import mol.corpora as K
    _held, _iter = [], K.SegmentPacker.__iter__
    K.SegmentPacker.__iter__ = lambda self: (_held.append(s.input_ids.tolist()) or s for s in _iter(self))
from mol.cache import TeacherCache
from mol.config import load_config
from mol.synthetic import instant_teacher
from mol.teacher import run_teacher_pass
cfg = load_config(data=json.loads(sys.argv[1]))
with instant_teacher(cfg.teacher.top_k, 49152):
    cache_dir, _ = run_teacher_pass(cfg)
print(json.dumps({"maxrss_kb": PEAK_KB, "tokens": TeacherCache(cache_dir).manifest["totals"]["tokens"]}))
""".replace("PEAK_KB", PEAK_KB)


def _peak(model_dir: Path, corpus: Path, root: Path, env: dict | None = None) -> dict:
    cfg = {"model": {"name": str(model_dir)},
           "data": {"max_seq_len": 1024, "val_fraction": 0.01,
                    "sources": [{"path": str(corpus), "corpus": "general", "subset": "synthetic"}]},
           "teacher": {"top_k": 31, "rows_per_shard": 16, "fidelity_sequences": 0, "cache_root": str(root)}}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_stage1_peak_memory_does_not_grow_with_the_corpus(tiny_model_dir, tmp_path):
    """Peak RSS over a tiny corpus (the fixed cost: imports, tokenizer, buffers), over N and over
    10N tokens. Holding the packed corpus in memory (what Stage 1 did before streaming) costs
    ~36 bytes a token: ~100 MB more at 10N than at N, twice the 10% of the fixed cost allowed
    (run to run, peaks vary by ~25 MB)."""
    sizes = {"base": 2_000, "n": 300_000, "10n": 3_000_000}
    peak = {name: _peak(tiny_model_dir, write_corpus(tmp_path / f"{name}.jsonl", tokens, seed=1), tmp_path / name)
            for name, tokens in sizes.items()}
    assert peak["10n"]["tokens"] > 8 * peak["n"]["tokens"]
    base = peak["base"]["maxrss_kb"]
    growth = peak["10n"]["maxrss_kb"] - peak["n"]["maxrss_kb"]
    assert growth <= 0.10 * base, (f"peak RSS grew by {growth / 1024:.0f} MB from {peak['n']['tokens']} to "
                                   f"{peak['10n']['tokens']} tokens (fixed cost {base / 1024:.0f} MB): {peak}")


# Stage 2 in a fresh process: two optimizer steps on a cache of the given size; prints its peak RSS.
TRAIN_CHILD = """
import json, os, sys
if os.environ.get("MOL_TEST_LOAD_WHOLE"):  # proves the test can fail: load every split, as pre-streaming Stage 2 did
    import mol.train as T
    class _Whole:
        def __init__(self, s): self.s = s
        def __getattr__(self, n): return getattr(self.s, n)
        def __len__(self): return len(self.s)
        def prefetch(self, i): pass
        def close(self): pass
    T.StreamingSequences = lambda cache, split, corpus=None, **kw: _Whole(cache.load(split, corpus))
from mol.config import load_config
from mol.train import train
train(load_config(data=json.loads(sys.argv[1])))
print(json.dumps({"maxrss_kb": PEAK_KB}))
""".replace("PEAK_KB", PEAK_KB)


def _cache_and_train_peak(model_dir: Path, tmp: Path, name: str, tokens: int, env: dict | None = None) -> int:
    from mol.config import load_config
    from mol.synthetic import instant_teacher
    from mol.teacher import run_teacher_pass

    cfg = {"model": {"name": str(model_dir)},
           "data": {"max_seq_len": 256, "val_fraction": 0.02, "sources": [
               {"path": str(write_corpus(tmp / f"{name}-d.jsonl", tokens // 2, seed=2)), "corpus": "domain", "subset": "d"},
               {"path": str(write_corpus(tmp / f"{name}-g.jsonl", tokens // 2, seed=3)), "corpus": "general", "subset": "g"}]},
           "teacher": {"top_k": 31, "rows_per_shard": 64, "fidelity_sequences": 0, "cache_root": str(tmp / "caches")},
           "train": {"global_batch": 4, "micro_batch": 2, "max_steps": 2, "eval_every": 0, "lr": 1e-3,
                     "out_dir": str(tmp / "runs"), "run_name": name + str(len(env or {})),
                     "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
           "eval": {"max_val_sequences": 2}}
    with instant_teacher(31, 49152):
        run_teacher_pass(load_config(data=cfg))
    r = subprocess.run([sys.executable, "-c", TRAIN_CHILD, json.dumps(cfg)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["maxrss_kb"]


def test_stage2_peak_memory_does_not_grow_with_the_cache(tiny_model_dir, tmp_path):
    """Two steps on a 100k-token cache and on a 1.5M-token one. Loading the splits whole (what
    Stage 2 did before the streaming reader) costs ~100 bytes a token over this range: ~130 MB
    more, over twice the 5% of the small run's peak (~1 GB) allowed; streaming measured -4 MB."""
    small = _cache_and_train_peak(tiny_model_dir, tmp_path, "small", 100_000)
    large = _cache_and_train_peak(tiny_model_dir, tmp_path, "large", 1_500_000)
    assert large - small <= 0.05 * small, f"peak RSS {small / 1024:.0f} MB -> {large / 1024:.0f} MB"
