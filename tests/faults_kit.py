"""Shared kit of the fault-injection suite for both stages: SIGKILL at any point, two writers,
corrupt caches, malformed corpora, bad configs, non-finite numerics and a full disk.

The suite is split by stage: `test_faults_stage1.py` (the teacher pass: SIGKILL, two writers,
corrupt caches, a full disk), `test_faults_stage2.py` (the trainer: SIGKILL, numerics, nothing wrong
accepted) and `test_faults_inputs.py` (malformed corpora, bad configs and numbers, a mistyped model).
This module holds what they share: the subprocess helpers, the cache and metrics comparisons, and the
small reference setup behind the session fixture `small` (defined in conftest.py).

Quick cases run in `make test` (the CLIs' `main()` called in-process where a subprocess would only
add start-up time). The seeded SIGKILL sweeps and every case again through a real
`python -m stages...` subprocess are marked `faults` (`make test-faults`).

A kill is either external (SIGKILL from this process when a file appears or after a seeded delay)
or self-inflicted at an exact point: a preamble run before the CLI wraps one library call so the
child SIGKILLs itself there, e.g. with a half-written shard on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import GEN, MED, tiny_config, write_jsonl
from mol import cache as C
from mol.config import load_config
from mol.teacher import run_teacher_pass

ROOT = Path(__file__).resolve().parents[1]
faults = pytest.mark.faults

# Timing fields differ between any two runs; every other number in metrics.jsonl must match.
TIMING_KEYS = {"tokens_per_s", "elapsed_s"}


# --------------------------------------------------------------------------- helpers


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env["TQDM_DISABLE"] = "1"
    # the child computes on this process's thread count (see assert_same_metrics)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(torch.get_num_threads())
    return env


def spawn_stage(module: str, args: list[str], log: Path, preamble: str = "") -> subprocess.Popen:
    """`python -m module args` with output to a file (an unread pipe would block a chatty child),
    on this process's torch thread count: its runs are compared bit for bit with runs made here."""
    code = (f"import torch\ntorch.set_num_threads({torch.get_num_threads()})\n" + preamble
            + "\nimport runpy, sys\n"
            f"sys.argv = [{module!r}] + {list(map(str, args))!r}\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    out = open(log, "w")
    try:
        return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    finally:
        out.close()


def run_stage(module: str, args: list[str], log: Path, preamble: str = "", timeout: float = 300) -> tuple[int, str]:
    p = spawn_stage(module, args, log, preamble)
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise AssertionError(f"{module} {args} ran past {timeout} s:\n{log.read_text()[-3000:]}")
    return rc, log.read_text()


def kill_when(proc: subprocess.Popen, cond, timeout: float = 120, every: float = 0.002) -> bool:
    """SIGKILL `proc` as soon as `cond()` holds; False when it exited before that."""
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            return False
        if time.monotonic() - t0 > timeout:
            proc.kill()
            proc.wait()
            raise AssertionError("kill condition never held")
        time.sleep(every)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def kill_after(proc: subprocess.Popen, delay: float) -> bool:
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def _units_root(cache_dir: Path) -> Path:
    """A config's set folder -> its cache_root's units/ (each test's cache_root is its own)."""
    return cache_dir.parent.parent / C.UNITS_DIR


def unit_shards(cache_dir: Path) -> list[Path]:
    return sorted(_units_root(cache_dir).glob("*/shard-*.parquet"))


def _name(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def ref_shards(cache_dir: Path) -> dict:
    """unit/shard -> its manifest entry, in the config's order."""
    out = {}
    for u in C.TeacherCache(cache_dir).units:
        out.update({f"{u.path.name}/{s['file']}": s for s in u.manifest["shards"]})
    return out


def check_cache_state(cache_dir: Path, ref: dict) -> dict:
    """What a kill left behind must be safe to read: every shard under its final name is complete
    (byte-identical to the uninterrupted run's), a unit manifest exists only over a complete unit,
    and a set manifest only over complete units."""
    present = unit_shards(cache_dir)
    for p in present:
        assert _name(p) in ref, f"unexpected shard {_name(p)}"
        assert pq.ParquetFile(p).metadata.num_rows == ref[_name(p)]["rows"], _name(p)
        assert pq.read_table(p).num_rows == ref[_name(p)]["rows"], _name(p)
        assert C.sha256_path(p) == ref[_name(p)]["sha256"], f"{_name(p)} differs from the uninterrupted run's"
    for unit in _units_root(cache_dir).glob("*"):
        if (unit / C.MANIFEST).exists():
            assert {n for n in ref if n.startswith(unit.name + "/")} <= {_name(p) for p in present}, \
                f"{unit.name}: manifest written before every shard existed"
            assert C.CacheUnit(unit).verify() == []
    has_manifest = (cache_dir / C.MANIFEST).exists()
    if has_manifest:
        assert len(present) == len(ref), "manifest written before every shard existed"
        assert C.TeacherCache(cache_dir).verify() == []
    tmp = [p for p in _units_root(cache_dir).glob("*/*.tmp*")] + list(cache_dir.glob("*.tmp*"))
    return {"shards": len(present), "tmp": bool(tmp), "manifest": has_manifest}


def shard_data(path: Path) -> tuple[C.ShardData, int, int]:
    """A shard's rows as the writer's ShardData (teacher ids as the stored gaps, footer metadata
    kept), with its k and a vocabulary size of its id width."""
    t = pq.read_table(path)
    k = t.schema.field(C.TOPK_IDS).type.value_type.list_size
    vocab = 1 << 16 if str(t.schema.field(C.INPUT_IDS).type.value_type) == "uint16" else 1 << 32
    ids = t.column(C.INPUT_IDS).combine_chunks()
    d = C.ShardData(seq_id=t.column(C.SEQ_ID).to_numpy().copy(), corpus=t.column(C.CORPUS)[0].as_py(),
                    subset=t.column(C.SUBSET)[0].as_py(), split=t.column(C.SPLIT).to_pylist(),
                    input_ids=ids.flatten().to_numpy().copy(), tok_off=ids.offsets.to_numpy().astype(np.int64),
                    metadata=dict(t.schema.metadata))
    if t.column(C.RESIDUAL).null_count == 0:
        d.topk_ids = t.column(C.TOPK_IDS).combine_chunks().flatten().flatten().to_numpy().reshape(-1, k).copy()
        d.topk_probs = t.column(C.TOPK_PROBS).combine_chunks().flatten().flatten().to_numpy().reshape(-1, k).copy()
        d.residual = t.column(C.RESIDUAL).combine_chunks().flatten().to_numpy().copy()
    return d, k, vocab


def rewrite_shard(path: Path, edit, target: Path | None = None) -> None:
    """Write the shard at `path` again (to `target`, default in place) with `edit(ShardData)` applied:
    values changed behind a shard's back, as a hand or a bug would, in a valid Parquet file."""
    d, k, vocab = shard_data(path)
    rows_per_group = pq.ParquetFile(path).metadata.row_group(0).num_rows
    edit(d)
    C.write_shard(target or path, C.shard_table(d, k, vocab), 6, row_group_rows=rows_per_group)


def vouch_for(shard: Path) -> None:
    """Make the unit manifest vouch for a shard's current bytes (size and sha256): only the checks
    beyond the checksum can then catch what was done to it."""
    mf = shard.parent / C.MANIFEST
    m = json.loads(mf.read_text())
    entry = next(s for s in m["shards"] if s["file"] == shard.name)
    entry.update(bytes=shard.stat().st_size, sha256=C.sha256_path(shard))
    mf.write_text(json.dumps(m))


def forge_resume(d: C.ShardData, **fields) -> None:
    """Edit a ShardData's resume record (its footer's `mol.resume`)."""
    rec = json.loads(d.metadata[C.RESUME_KEY])
    rec.update(fields)
    d.metadata[C.RESUME_KEY] = json.dumps(rec).encode()


def assert_complete_like(cache_dir: Path, ref: dict) -> None:
    got = ref_shards(cache_dir)
    assert [(n, s["sha256"]) for n, s in got.items()] == [(n, s["sha256"]) for n, s in ref.items()]
    assert C.TeacherCache(cache_dir).verify() == []
    assert not list(_units_root(cache_dir).glob("*/*.tmp*"))


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    """Two runs that must be identical (a resume after a kill against the uninterrupted run) have
    bit-identical metrics, timings aside. The README promises identical resumes, and they are: the
    same data order, seeds, RNG states from the checkpoint and, since spawn_stage hands the child this
    process's thread count, the same reduction order. No tolerance: any difference is a resume that
    is not the run it claims to continue (a tolerance of 1e-9 once hid nothing and then failed on
    a 7.7e-7 KL whose two thread counts summed in two orders)."""
    assert [(r["type"], r["step"]) for r in a] == [(r["type"], r["step"]) for r in b]
    for x, y in zip(a, b):
        assert set(x) == set(y), (x["step"], set(x) ^ set(y))
        diff = {k: (v, y[k]) for k, v in x.items() if k not in TIMING_KEYS and y[k] != v}
        assert not diff, (x["type"], x["step"], diff)


F32_EPS = float(np.finfo(np.float32).eps)


def metric_tolerance(key: str, record: dict, ulps: float) -> float:
    """The absolute tolerance of one metric of a run computed another way (other processes, another
    reduction order): `ulps` float32 epsilons of the quantity's scale. A loss or CE is its own scale.
    A KL is a sum of p·(log p − log q) whose terms are log-probabilities of the CE's size that nearly
    cancel: its rounding scales with the record's CE, not with its own value (a KL of 1e-6 next to a
    CE of 8 rounds at about 8·eps, so a tolerance relative to 1e-6 would fail on rounding alone)."""
    if "kl" in key:
        scale = max(abs(v) for k, v in record.items() if k.startswith(("ce", "loss")) and isinstance(v, float))
    else:
        scale = abs(record[key])
    return ulps * F32_EPS * scale


def assert_close_metrics(a: list[dict], b: list[dict], keys: tuple[str, ...], ulps: float) -> None:
    """The `keys` of two runs that differ only in how the sums were split (e.g. one process against
    DDP's two) agree within metric_tolerance."""
    assert [(r["type"], r["step"]) for r in a] == [(r["type"], r["step"]) for r in b]
    for x, y in zip(a, b):
        for key in keys:
            if key in x:
                tol = metric_tolerance(key, x, ulps)
                assert abs(y[key] - x[key]) <= tol, (x["type"], x["step"], key, x[key], y[key], tol)


def latest_state(run_dir: Path) -> tuple[str, dict]:
    root = run_dir / "checkpoints"
    name = (root / "latest").read_text().strip()
    return name, torch.load(root / name / "state.pt", weights_only=False)


# --------------------------------------------------------------------------- setups


def _small_cfg(model_dir: Path, corpora: dict, cache_root: Path, **train) -> dict:
    """10 sequences in 5 shards of 2: enough shards to kill between, seconds to build."""
    d = tiny_config(model_dir, corpora, cache_root, data={"max_train_sequences": 4, "max_val_sequences": 1},
                    teacher={"rows_per_shard": 2})
    if train:
        d["train"] = train
    return d


def train_section(out_dir: Path, **over) -> dict:
    return {"global_batch": 4, "micro_batch": 2, "max_steps": 6, "eval_every": 2, "save_every": 1, "lr": 1e-3,
            "out_dir": str(out_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
            **over}


def build_small(tiny_model_dir: Path, tmp_path_factory) -> dict:
    """A reference cache built without interruption, and the config (dict) that names it."""
    root = tmp_path_factory.mktemp("faults-small")
    corpora = {"med": write_jsonl(root / "med.jsonl", MED), "gen": write_jsonl(root / "gen.jsonl", GEN)}
    d = _small_cfg(tiny_model_dir, corpora, root / "ref-caches")
    ref_dir, status = run_teacher_pass(load_config(data=d))
    assert status == "built"
    ref = ref_shards(ref_dir)
    assert len(ref) >= 4
    return {"root": root, "corpora": corpora, "cfg": d, "ref_dir": ref_dir, "ref": ref, "model": tiny_model_dir}


def train_cfg_file(small, tmp: Path) -> tuple[Path, Path]:
    d = {**small["cfg"], "train": train_section(tmp / "runs")}
    return write_yaml(tmp / "train.yaml", d), tmp / "runs" / "x"
