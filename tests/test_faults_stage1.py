"""Fault injection, Stage 1 (the teacher pass): SIGKILL at any point, two writers, corrupt caches
and a full disk. The shared helpers and the explanation of the kills are in faults_kit.py."""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import GEN, MED, tiny_config, write_jsonl
from faults_kit import (assert_complete_like, check_cache_state, faults, forge_resume, kill_after, kill_when, ref_shards,
                        rewrite_shard, run_stage, spawn_stage, train_section, unit_shards, vouch_for, write_yaml)
from mol import cache as C
from mol.config import load_config
from mol.cache import cache_lock
from mol.teacher import run_teacher_pass
from mol.train import TrainingError, train


# Preambles: each wraps one call so the child SIGKILLs itself at an exact point.

def _pre_kill_in_shard_write(n: int, keep_fraction: float) -> str:
    """Shard number n (1-based) reaches disk under its temp name with `keep_fraction` of its bytes."""
    return f"""
import itertools, os, signal, pyarrow.parquet as pq
_real, _n = pq.write_table, itertools.count(1)
def _write(table, where, *a, **kw):
    mine = next(_n)  # shards are written by parallel threads: the count must be this call's own
    _real(table, where, *a, **kw)
    if mine == {n}:
        size = os.path.getsize(where)
        with open(where, "r+b") as f:
            f.truncate(int(size * {keep_fraction}))
        os.kill(os.getpid(), signal.SIGKILL)
pq.write_table = _write
"""


def _pre_slow_shards(seconds: float) -> str:
    return f"""
import time, mol.cache.writer as W
_real = W.write_shard
def _slow(*a, **kw):
    _real(*a, **kw)
    time.sleep({seconds})
W.write_shard = _slow
"""


def _pre_disk_full(n: int) -> str:
    """The n-th shard of the first segment fails as a full disk does: part of the file written, then
    ENOSPC. Chosen by name: parallel writer threads reach pq.write_table in no fixed order."""
    return f"""
import errno, pyarrow.parquet as pq
_real = pq.write_table
def _write(table, where, *a, **kw):
    if "/shard-00000-{n - 1:05d}.parquet" in str(where):
        with open(where, "wb") as f:
            f.write(b"PAR1" + bytes(100))
        raise OSError(errno.ENOSPC, "No space left on device", str(where))
    return _real(table, where, *a, **kw)
pq.write_table = _write
"""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def full(tiny_model_dir, tmp_path_factory):
    """The whole tiny corpora (13 shards, ~10 s per pass): room for kills to land anywhere."""
    root = tmp_path_factory.mktemp("faults-full")
    corpora = {"med": write_jsonl(root / "med.jsonl", MED), "gen": write_jsonl(root / "gen.jsonl", GEN)}
    d = tiny_config(tiny_model_dir, corpora, root / "ref-caches")
    ref_dir, _ = run_teacher_pass(load_config(data=d))
    ref = ref_shards(ref_dir)
    # one uninterrupted CLI run: its length scales the random kill delays, and its shards must
    # equal the in-process build's (the comparison every trial relies on)
    cfg_path, cache_dir = _fresh_teacher_cfg(d, root, "cli-ref")
    t0 = time.monotonic()
    rc, out = run_stage("stages.teacher_cache", [cfg_path], root / "cli-ref.log")
    assert rc == 0, out[-3000:]
    assert_complete_like(cache_dir, ref)
    return {"root": root, "corpora": corpora, "cfg": d, "ref_dir": ref_dir, "ref": ref, "model": tiny_model_dir,
            "seconds": time.monotonic() - t0}


def _fresh_teacher_cfg(base: dict, tmp: Path, name: str) -> tuple[Path, Path]:
    """The base config with its own cache_root: returns (config file, the cache folder it names)."""
    d = json.loads(json.dumps(base))
    d["teacher"]["cache_root"] = str(tmp / name)
    cfg_path = write_yaml(tmp / f"{name}.yaml", d)
    return cfg_path, C.resolve_cache_key(load_config(data=d)).cache_dir


# --------------------------------------------------------------------------- 1. Stage 1 SIGKILL


def _teacher_trial(setup: dict, tmp: Path, seed: int, mode: str, resume_in_process: bool, second_kill: bool) -> list:
    """Kill the teacher pass once (maybe twice), check what is on disk after each kill, finish it,
    and compare the shards with the uninterrupted run's. Returns what each kill left behind."""
    rng = random.Random(seed)
    cfg_path, cache_dir = _fresh_teacher_cfg(setup["cfg"], tmp, f"trial{seed}")
    ref, n = setup["ref"], len(setup["ref"])
    seen = []

    def one_kill(mode: str, tag: str) -> None:
        log = tmp / f"{tag}.log"
        if mode == "mid_write":       # a half-written temp shard, then death
            rc, _ = run_stage("stages.teacher_cache", [cfg_path], log, _pre_kill_in_shard_write(rng.randint(1, 3), 0.5))
            assert rc == -signal.SIGKILL
            killed = True
        elif mode == "before_rename":  # a complete temp shard, killed before its rename
            rc, _ = run_stage("stages.teacher_cache", [cfg_path], log, _pre_kill_in_shard_write(rng.randint(1, 3), 1.0))
            assert rc == -signal.SIGKILL
            killed = True
        elif mode == "shard":          # right after the k-th shard appears (k = 0: model loaded, none yet)
            have = len(unit_shards(cache_dir)) if cache_dir.is_dir() else 0
            k = rng.randint(have + 1 if have else 0, n)
            proc = spawn_stage("stages.teacher_cache", [cfg_path], log)
            cond = ((lambda: (cache_dir / "config.yaml").exists()) if k == 0
                    else (lambda: len(unit_shards(cache_dir)) >= k if cache_dir.is_dir() else False))
            killed = kill_when(proc, cond)
        else:                          # after a seeded delay: start-up, packing, shards or manifest
            proc = spawn_stage("stages.teacher_cache", [cfg_path], log)
            killed = kill_after(proc, rng.uniform(0.05, 1.0) * setup.get("seconds", 10.0))
        state = check_cache_state(cache_dir, ref)
        seen.append({"mode": mode, "killed": killed, **state})

    one_kill(mode, f"t{seed}-1")
    if second_kill and not seen[-1]["manifest"] and seen[-1]["shards"] < n:
        one_kill("shard", f"t{seed}-2")
    if resume_in_process:
        _, status = run_teacher_pass(load_config(cfg_path))
    else:
        rc, out = run_stage("stages.teacher_cache", [cfg_path], tmp / f"t{seed}-final.log")
        assert rc == 0, out[-3000:]
    assert_complete_like(cache_dir, ref)
    return seen


@pytest.mark.parametrize("seed,mode", [(1, "shard"), (2, "mid_write")])
def test_teacher_sigkill_quick(small, tmp_path, seed, mode):
    seen = _teacher_trial(small, tmp_path, seed, mode, resume_in_process=True, second_kill=False)
    assert seen[0]["killed"] and not seen[0]["manifest"]


@faults
@pytest.mark.parametrize("seed", range(12))
def test_teacher_sigkill_sweep(full, tmp_path, seed):
    mode = ["shard", "delay", "mid_write", "before_rename"][seed % 4]
    seen = _teacher_trial(full, tmp_path, seed, mode, resume_in_process=False, second_kill=seed % 2 == 1)
    print(f"trial {seed} (uninterrupted CLI pass {full['seconds']:.1f} s): {seen}")


# --------------------------------------------------------------------------- 2. two writers


def test_second_writer_is_refused(small, tmp_path, capsys):
    from stages import teacher_cache

    cfg_path, cache_dir = _fresh_teacher_cfg(small["cfg"], tmp_path, "lock")
    with cache_lock(cache_dir):
        with pytest.raises(C.CacheError, match="lock"):
            with cache_lock(cache_dir):
                pass
        assert teacher_cache.main([str(cfg_path)]) == 2
        err = capsys.readouterr().err
        assert "another teacher pass is writing this cache (lock held)" in err and str(cache_dir) in err
        assert not unit_shards(cache_dir)
    _, status = run_teacher_pass(load_config(cfg_path))
    assert status == "built"
    assert_complete_like(cache_dir, small["ref"])


@faults
def test_two_teacher_processes_at_once(small, tmp_path):
    cfg_path, cache_dir = _fresh_teacher_cfg(small["cfg"], tmp_path, "race")
    # the first pass is slowed so it still holds the lock when the second arrives
    first = spawn_stage("stages.teacher_cache", [cfg_path], tmp_path / "first.log", _pre_slow_shards(1.5))
    t0 = time.monotonic()
    while not unit_shards(cache_dir):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() - t0 < 120
        time.sleep(0.01)
    rc, out = run_stage("stages.teacher_cache", [cfg_path], tmp_path / "second.log")
    assert first.poll() is None, "the first pass ended before the second reached the lock: test too slow"
    assert rc == 2, out[-3000:]
    assert "another teacher pass is writing this cache (lock held)" in out
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert_complete_like(cache_dir, small["ref"])


def _pre_pause_before_set_manifest(here: str, go: str) -> str:
    """The pass stops just before it writes its set manifest (every unit reused and checked) until
    the test's go file appears."""
    return f"""
import os, time, mol.teacher as T
_real = T._write_set
def _paused(*a, **kw):
    open({here!r}, "w").close()
    t0 = time.monotonic()
    while not os.path.exists({go!r}) and time.monotonic() - t0 < 120:
        time.sleep(0.01)
    return _real(*a, **kw)
T._write_set = _paused
"""


@faults
def test_gc_during_a_reusing_teacher_pass_cli(small, tmp_path):
    """A teacher pass that reuses every unit (another order of the same sources: a set of its own),
    and `cache_info --gc` with a config that uses none of them, run while the pass is between its
    reuse checks and its set manifest: gc skips each unit naming the pass's pid, the pass writes a
    set that verifies, and the next pass finds it complete. Before: the reusing pass took no lock,
    gc removed the units, and every later pass said "nothing to do" over a set naming them."""
    root = tmp_path / "caches"
    shutil.copytree(small["ref_dir"].parent.parent, root)
    d = {**small["cfg"], "teacher": {**small["cfg"]["teacher"], "cache_root": str(root)}}
    reuse = write_yaml(tmp_path / "reuse.yaml", {**d, "data": {**d["data"], "sources": d["data"]["sources"][::-1]}})
    other = write_yaml(tmp_path / "other.yaml", {**d, "teacher": {**d["teacher"], "top_k": 4}})
    units = sorted(p for p in (root / C.UNITS_DIR).iterdir())
    here, go = tmp_path / "paused", tmp_path / "go"
    teacher = spawn_stage("stages.teacher_cache", [reuse], tmp_path / "teacher.log",
                          _pre_pause_before_set_manifest(str(here), str(go)))
    try:
        t0 = time.monotonic()
        while not here.exists():
            assert teacher.poll() is None, (tmp_path / "teacher.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 120, "the pass never reached its set manifest"
            time.sleep(0.02)
        rc, out = run_stage("stages.cache_info", ["--gc", str(other), "--yes"], tmp_path / "gc.log")
    finally:
        go.touch()
    assert rc == 0 and "Traceback" not in out, out[-3000:]
    for u in units:
        assert f"skip   {u} (in use by a trainer, an evaluation or a teacher pass reading it: pid {teacher.pid})" in out, out
        assert (u / C.MANIFEST).is_file()
    assert teacher.wait(timeout=300) == 0, (tmp_path / "teacher.log").read_text()[-3000:]
    rc, out = run_stage("stages.teacher_cache", [reuse], tmp_path / "again.log")
    assert rc == 0 and "teacher cache up-to-date" in out, out[-3000:]
    assert C.TeacherCache(C.resolve_cache_key(load_config(reuse)).cache_dir).verify() == []


# --------------------------------------------------------------------------- 3. corrupt caches


def _flip(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


def _truncate(p: Path) -> None:
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])


def _unit0(d: Path) -> Path:
    """The set folder d's first unit (the domain source)."""
    return d.parent.parent / json.loads((d / C.MANIFEST).read_text())["units"][0]["dir"]


def _shard0(d: Path, part: int) -> Path:
    return _unit0(d) / C.shard_name(0, part)


def _edit_json(path_of, fn):
    def edit(d: Path) -> None:
        p = path_of(d)
        m = json.loads(p.read_text())
        fn(m)
        p.write_text(json.dumps(m))
    return edit


def _edit_set(fn):
    return _edit_json(lambda d: d / C.MANIFEST, fn)


def _edit_unit(fn):
    return _edit_json(lambda d: _unit0(d) / C.MANIFEST, fn)


def _replace_shard(make):
    """Put another valid Parquet file in shard part 0's place and make the manifest vouch for its
    bytes: only the checks beyond the checksum can catch it."""
    def edit(d: Path) -> None:
        target = _shard0(d, 0)
        make(d, target)
        mf = _unit0(d) / C.MANIFEST
        m = json.loads(mf.read_text())
        m["shards"][0].update(bytes=target.stat().st_size, sha256=C.sha256_path(target))
        mf.write_text(json.dumps(m))
    return edit


def _other_k(d: Path, target: Path) -> None:
    t = pq.read_table(target)
    k = t.schema.field(C.TOPK_IDS).type.value_type.list_size
    small_k = C.ShardData(seq_id=t.column(C.SEQ_ID).to_numpy(), corpus="domain", subset="med",
                          split=t.column(C.SPLIT).to_pylist(), input_ids=np.ones(2 * t.num_rows, np.uint16),
                          tok_off=np.arange(0, 2 * t.num_rows + 1, 2), topk_ids=np.ones((t.num_rows, k - 1), np.uint16),
                          topk_probs=np.ones((t.num_rows, k - 1), np.uint16), residual=np.ones(t.num_rows, np.uint16),
                          metadata=pq.read_schema(target).metadata)
    C.write_shard(target, C.shard_table(small_k, k - 1, 49152), 3)


def _foreign(d: Path, target: Path) -> None:
    other = json.loads((d / C.MANIFEST).read_text())["units"][1]["dir"]
    shutil.copy(d.parent.parent / other / C.shard_name(0, 0), target)


def _tamper(edit):
    """Rewrite shard part 0 with `edit` applied to its values, the manifest fixed up to its bytes."""
    def run(d: Path) -> None:
        rewrite_shard(_shard0(d, 0), edit)
        vouch_for(_shard0(d, 0))
    return run


def _zero_probs(d: C.ShardData) -> None:
    d.topk_probs[:] = 0


def _past_vocab(d: C.ShardData) -> None:
    d.input_ids[3] = 60000


def _teacher_past_vocab(d: C.ShardData) -> None:
    d.topk_ids[2, -1] = 49160 - int(d.topk_ids[2, :-1].astype(np.int64).sum())


# (id, corruption, cache_info exit code, text in cache_info's output, text in the training error,
#  refused before the run starts: False where only reading the shard can tell, which Stage 2's reader
#  does when it first needs the shard, before any of its rows reaches a step)
CORRUPTIONS = [
    ("flipped-bytes", lambda d: _flip(_shard0(d, 1)), 1,
     "shard-00000-00001.parquet: sha256 mismatch", "shard-00000-00001.parquet: sha256 mismatch"),
    ("truncated", lambda d: _truncate(_shard0(d, 1)), 1,
     "shard-00000-00001.parquet: ", "shard-00000-00001.parquet: "),
    ("deleted", lambda d: _shard0(d, 2).unlink(), 1,
     "shard-00000-00002.parquet: missing", "shard-00000-00002.parquet: missing"),
    ("manifest-sha256", _edit_unit(lambda m: m["shards"][0].update(sha256="0" * 64)), 1,
     "shard-00000-00000.parquet: sha256 mismatch", "shard-00000-00000.parquet: sha256 mismatch"),
    ("manifest-rows", _edit_unit(lambda m: m["shards"][0].update(rows=m["shards"][0]["rows"] + 1)), 1,
     "shard-00000-00000.parquet: 2 rows, manifest says 3", "shard-00000-00000.parquet: 2 rows, manifest says 3"),
    ("manifest-shard-dropped", _edit_unit(lambda m: m["shards"].pop()), 1,
     "shard-00000-00002.parquet", "shard-00000-00002.parquet"),
    ("other-k-same-checksum", _replace_shard(_other_k), 1,
     "schema differs from the cache contract (k = 5)", "schema differs from the cache contract (k = 5)"),
    ("foreign-shard-same-checksum", _replace_shard(_foreign), 1,
     "does not name this unit's segment 0 part 0", "does not name this unit's segment 0 part 0"),
    ("manifest-invalid-json", lambda d: (d / C.MANIFEST).write_text('{"schema_version": 3, "units": ['), 2,
     "unreadable manifest", "unreadable manifest"),
    ("manifest-wrong-structure", _edit_set(lambda m: m.pop("units")), 2,
     "manifest", "manifest"),
    ("unit-manifest-wrong-structure", _edit_unit(lambda m: m["shards"][0].pop("sha256")), 2,
     "malformed manifest: shards[0]: 'sha256' missing", "malformed manifest: shards[0]: 'sha256' missing"),
    ("unit-manifest-inner-type", _edit_unit(lambda m: m["key"].update(top_k="31")), 2,
     "'key.top_k' missing or not a int", "'key.top_k' missing or not a int"),
    ("old-schema", _edit_unit(lambda m: m.update(schema_version=2)), 2,
     "rebuild the cache", "rebuild the cache"),
    ("manifest-missing", lambda d: (d / C.MANIFEST).unlink(), 2,
     "no manifest.json; the teacher pass did not finish", "no complete teacher cache"),
    ("manifest-deeply-nested", lambda d: (d / C.MANIFEST).write_text("[" * 100_000), 2,
     "unreadable manifest (nested deeper", "unreadable manifest (nested deeper"),
    ("input-id-past-vocab-same-checksum", _tamper(_past_vocab), 1,
     "shard-00000-00000.parquet: row 0: input id 60000 at token 3 is >= the vocabulary size",
     "shard-00000-00000.parquet: row 0: input id 60000 at token 3 is >= the vocabulary size"),
    ("teacher-id-past-vocab-same-checksum", _tamper(_teacher_past_vocab), 1,
     "shard-00000-00000.parquet: row 0 position 2: teacher id 49160",
     "shard-00000-00000.parquet: row 0 position 2: teacher id 49160"),
    ("zero-prob-codes-same-checksum", _tamper(_zero_probs), 1,
     "shard-00000-00000.parquet: row 0 position 0: probability codes [0, 0, 0, 0, 0] outside [1, 1023]",
     "shard-00000-00000.parquet: row 0 position 0: probability codes [0, 0, 0, 0, 0] outside [1, 1023]"),
]
LAZY = {"flipped-bytes", "manifest-sha256", "input-id-past-vocab-same-checksum", "teacher-id-past-vocab-same-checksum",
        "zero-prob-codes-same-checksum"}
"""Caught by Stage 2's reader as it first reads the shard (after the run folder exists), not at open."""


def _corrupt_copy(small, tmp: Path, case) -> Path:
    """A copy of the reference cache root (units and set) with one corruption; returns its set folder."""
    root = tmp / "cache"
    shutil.copytree(small["ref_dir"].parent.parent, root)
    d = root / C.SETS_DIR / small["ref_dir"].name
    case[1](d)
    return d


def _train_cfg_on(small, cache_dir: Path, tmp: Path, **over) -> dict:
    return {**small["cfg"], "train": train_section(tmp / "runs", cache_dir=str(cache_dir), **over)}


@pytest.mark.parametrize("case", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_cache_is_refused(small, tmp_path, capsys, case):
    from stages import cache_info

    d = _corrupt_copy(small, tmp_path, case)
    rc = cache_info.main(["--path", str(d)])
    out = capsys.readouterr()
    assert rc == case[2], out
    assert case[3] in out.out + out.err
    with pytest.raises((TrainingError, C.CacheError)) as e:
        train(load_config(data=_train_cfg_on(small, d, tmp_path)))
    assert case[4] in str(e.value)
    runs = tmp_path / "runs"
    if case[0] in LAZY:  # stopped at the first read of the shard: no step ever finished
        assert not list(runs.glob("*/summary.json")) and not list(runs.glob("*/adapter"))
    else:
        assert not runs.exists(), "training started on a bad cache"


@faults
@pytest.mark.parametrize("case", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_cache_is_refused_cli(small, tmp_path, case):
    d = _corrupt_copy(small, tmp_path, case)
    rc, out = run_stage("stages.cache_info", ["--path", d], tmp_path / "info.log")
    assert rc == case[2] and case[3] in out, out[-3000:]
    cfg = write_yaml(tmp_path / "train.yaml", _train_cfg_on(small, d, tmp_path))
    rc, out = run_stage("stages.train", [cfg, "train.run_name=x"], tmp_path / "train.log")
    assert rc == 2 and case[4] in out and "Traceback" not in out, out[-3000:]
    if case[0] not in LAZY:
        assert not (tmp_path / "runs").exists()


def _partial_unit(small, tmp: Path, keep_parts: int) -> tuple[Path, Path, Path]:
    """A copy of the reference cache whose first unit holds only parts 0..keep_parts-1 and no
    manifest (a pass killed there), and no set manifest; returns (config file, set folder, unit)."""
    root = tmp / "cache"
    shutil.copytree(small["ref_dir"].parent.parent, root)
    d = root / C.SETS_DIR / small["ref_dir"].name
    unit = _unit0(d)
    (d / C.MANIFEST).unlink()
    (unit / C.MANIFEST).unlink()
    for p in unit.glob(C.SHARD_GLOB):
        if C.parse_shard_name(p.name)[1] >= keep_parts:
            p.unlink()
    cfg = json.loads(json.dumps(small["cfg"]))
    cfg["teacher"]["cache_root"] = str(root)
    return write_yaml(tmp / "c.yaml", cfg), d, unit


def test_a_forged_resume_record_is_not_resumed_from(small, tmp_path):
    """Part 0 copied as part 1 with its resume record edited to name part 1: the resumed pass would
    have blessed the copy (its rows twice, duplicate seq_ids, verify ok); it refuses it, naming it."""
    cfg_path, d, unit = _partial_unit(small, tmp_path, 1)
    rewrite_shard(unit / C.shard_name(0, 0), lambda x: forge_resume(x, part=1), target=unit / C.shard_name(0, 1))
    with pytest.raises(C.CacheError, match=r"shard-00000-00001.parquet: its rows contradict its resume record "
                                           r"\(row 0: seq_id 0, where its place in the unit gives 2"):
        run_teacher_pass(load_config(cfg_path))
    assert not (unit / C.MANIFEST).exists() and not (d / C.MANIFEST).exists()
    (unit / C.shard_name(0, 1)).unlink()
    assert run_teacher_pass(load_config(cfg_path))[1] == "resumed"
    assert_complete_like(d, small["ref"])


def test_a_stray_shard_past_the_resume_prefix_fails_the_pass(small, tmp_path, capsys):
    """A shard file no segment of the unit reaches (left by another pass, copied in): Stage 1 said
    "done" (exit 0) and every later verify refused the unit; now the pass fails at once, naming the
    file, before the unit's manifest."""
    from stages import teacher_cache

    cfg_path, d, unit = _partial_unit(small, tmp_path, 1)
    shutil.copy(unit / C.shard_name(0, 0), unit / C.shard_name(0, 9))
    assert teacher_cache.main([str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert f"{unit / C.shard_name(0, 9)}: a shard file that is no part of this unit's segments" in err, err
    assert "Traceback" not in err and not (unit / C.MANIFEST).exists() and not (d / C.MANIFEST).exists()
    (unit / C.shard_name(0, 9)).unlink()
    assert teacher_cache.main([str(cfg_path)]) == 0
    assert_complete_like(d, small["ref"])


# --------------------------------------------------------------------------- 4. disk full


def _full_disk_on(monkeypatch, n: int, where: str) -> None:
    """The n-th shard write fails with ENOSPC: in pq.write_table (a partial file left) or os.replace."""
    counter = itertools.count(1)
    if where == "write":
        real = pq.write_table

        def fail(table, path, *a, **kw):
            # by name: parallel writer threads reach pq.write_table in no fixed order
            if f"/shard-00000-{n - 1:05d}.parquet" in str(path) and next(counter) == 1:
                Path(path).write_bytes(b"PAR1" + bytes(100))
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(table, path, *a, **kw)

        monkeypatch.setattr(pq, "write_table", fail)
    else:
        real = os.replace

        def fail(src, dst, *a, **kw):
            if str(dst).endswith(".parquet"):
                if next(counter) == n:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", fail)


@pytest.mark.parametrize("where", ["write", "rename"])
def test_disk_full_while_writing_a_shard(small, tmp_path, monkeypatch, capsys, where):
    from stages import teacher_cache

    cfg_path, cache_dir = _fresh_teacher_cfg(small["cfg"], tmp_path, "full")
    _full_disk_on(monkeypatch, 2, where)
    assert teacher_cache.main([str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "shard-00000-00001.parquet" in err and "No space left on device" in err, err
    state = check_cache_state(cache_dir, small["ref"])
    assert state == {"shards": 1, "tmp": False, "manifest": False}
    monkeypatch.undo()
    _, status = run_teacher_pass(load_config(cfg_path))
    assert status == "resumed"
    assert_complete_like(cache_dir, small["ref"])


def test_disk_full_while_writing_the_manifest(small, tmp_path, monkeypatch):
    cfg_path, cache_dir = _fresh_teacher_cfg(small["cfg"], tmp_path, "full")
    real = os.replace

    def fail(src, dst, *a, **kw):
        if str(dst).endswith(C.MANIFEST):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(C.CacheError, match=C.MANIFEST):
        run_teacher_pass(load_config(cfg_path))
    unit0 = [n for n in small["ref"] if n.startswith(next(iter(small["ref"])).split("/")[0] + "/")]
    assert check_cache_state(cache_dir, small["ref"]) == {"shards": len(unit0), "tmp": False, "manifest": False}
    monkeypatch.undo()
    assert run_teacher_pass(load_config(cfg_path))[1] == "resumed"
    assert_complete_like(cache_dir, small["ref"])


@faults
def test_disk_full_cli(small, tmp_path):
    cfg_path, cache_dir = _fresh_teacher_cfg(small["cfg"], tmp_path, "full")
    rc, out = run_stage("stages.teacher_cache", [cfg_path], tmp_path / "a.log", _pre_disk_full(2))
    assert rc == 2 and "shard-00000-00001.parquet" in out and "No space left on device" in out, out[-3000:]
    assert "Traceback" not in out
    assert check_cache_state(cache_dir, small["ref"]) == {"shards": 1, "tmp": False, "manifest": False}
    rc, out = run_stage("stages.teacher_cache", [cfg_path], tmp_path / "b.log")
    assert rc == 0 and "teacher cache resumed" in out, out[-3000:]
    assert_complete_like(cache_dir, small["ref"])

