"""Fault injection for both stages: SIGKILL at any point, two writers, corrupt caches, malformed
corpora, bad configs, non-finite numerics and a full disk.

Quick cases run in `make test` (the CLIs' `main()` called in-process where a subprocess would only
add start-up time). The seeded SIGKILL sweeps and every case again through a real
`python -m stages...` subprocess are marked `faults` (`make test-faults`).

A kill is either external (SIGKILL from this process when a file appears or after a seeded delay)
or self-inflicted at an exact point: a preamble run before the CLI wraps one library call so the
child SIGKILLs itself there, e.g. with a half-written shard on disk.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import GEN, MED, tiny_config, write_jsonl
from mol import cache as C
from mol.batching import collate
from mol.config import load_config
from mol.losses import chunked_mol_loss
from mol.teacher import cache_lock, run_teacher_pass
from mol.train import TrainingError, train

ROOT = Path(__file__).resolve().parents[1]
faults = pytest.mark.faults

# Timing fields differ between any two runs; every other number in metrics.jsonl must match.
TIMING_KEYS = {"tokens_per_s", "elapsed_s"}


# --------------------------------------------------------------------------- helpers


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env["TQDM_DISABLE"] = "1"
    return env


def _spawn(module: str, args: list[str], log: Path, preamble: str = "") -> subprocess.Popen:
    """`python -m module args` with output to a file (an unread pipe would block a chatty child)."""
    code = (preamble + "\nimport runpy, sys\n"
            f"sys.argv = [{module!r}] + {list(map(str, args))!r}\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    out = open(log, "w")
    try:
        return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(), stdout=out,
                                stderr=subprocess.STDOUT)
    finally:
        out.close()


def _run(module: str, args: list[str], log: Path, preamble: str = "", timeout: float = 300) -> tuple[int, str]:
    p = _spawn(module, args, log, preamble)
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise AssertionError(f"{module} {args} ran past {timeout} s:\n{log.read_text()[-3000:]}")
    return rc, log.read_text()


def _kill_when(proc: subprocess.Popen, cond, timeout: float = 120, every: float = 0.002) -> bool:
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


def _kill_after(proc: subprocess.Popen, delay: float) -> bool:
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


def _shards(cache_dir: Path) -> list[Path]:
    return sorted(_units_root(cache_dir).glob("*/shard-*.parquet"))


def _name(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def _ref_shards(cache_dir: Path) -> dict:
    """unit/shard -> its manifest entry, in the config's order."""
    out = {}
    for u in C.TeacherCache(cache_dir).units:
        out.update({f"{u.path.name}/{s['file']}": s for s in u.manifest["shards"]})
    return out


def _check_cache_state(cache_dir: Path, ref: dict) -> dict:
    """What a kill left behind must be safe to read: every shard under its final name is complete
    (byte-identical to the uninterrupted run's), a unit manifest exists only over a complete unit,
    and a set manifest only over complete units."""
    present = _shards(cache_dir)
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


def _assert_complete_like(cache_dir: Path, ref: dict) -> None:
    got = _ref_shards(cache_dir)
    assert [(n, s["sha256"]) for n, s in got.items()] == [(n, s["sha256"]) for n, s in ref.items()]
    assert C.TeacherCache(cache_dir).verify() == []
    assert not list(_units_root(cache_dir).glob("*/*.tmp*"))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert [(r["type"], r["step"]) for r in a] == [(r["type"], r["step"]) for r in b]
    for x, y in zip(a, b):
        assert set(x) == set(y), (x["step"], set(x) ^ set(y))
        for key, v in x.items():
            if key in TIMING_KEYS or not isinstance(v, (int, float)):
                continue
            assert y[key] == pytest.approx(v, rel=1e-5, abs=1e-9), (x["type"], x["step"], key, v, y[key])


def _latest_state(run_dir: Path) -> tuple[str, dict]:
    root = run_dir / "checkpoints"
    name = (root / "latest").read_text().strip()
    return name, torch.load(root / name / "state.pt", weights_only=False)


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
import time, mol.cache as C
_real = C.write_shard
def _slow(*a, **kw):
    _real(*a, **kw)
    time.sleep({seconds})
C.write_shard = _slow
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


def _pre_kill_in_checkpoint(step: int) -> str:
    """Checkpoint `step` is half written (state.pt truncated) when the trainer dies."""
    return f"""
import os, signal, torch
_real = torch.save
def _save(obj, f, *a, **kw):
    _real(obj, f, *a, **kw)
    if isinstance(obj, dict) and obj.get("step") == {step}:
        f.flush()
        os.ftruncate(f.fileno(), f.tell() // 2)
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = _save
"""


def _pre_torn_metrics_line(step: int) -> str:
    """The trainer dies half-way through the metrics line of `step` (a torn last line)."""
    return f"""
import json, os, signal
from mol.run_folder import RunFolder
_real = RunFolder.append_metric
def _append(self, rec):
    if rec.get("type") == "train" and rec.get("step") == {step}:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec)[:25])
        os.kill(os.getpid(), signal.SIGKILL)
    _real(self, rec)
RunFolder.append_metric = _append
"""


def _pre_kill_in_outputs(step: int) -> str:
    """The trainer dies while saving the adapter, after the final validation line is written."""
    return f"""
import os, signal
from mol.run_folder import RunFolder
def _die(self, *a, **kw):
    assert [r["step"] for r in self.metrics()][-1] == {step}  # the final validation line is written
    (self.path / "adapter").mkdir()
    os.kill(os.getpid(), signal.SIGKILL)
RunFolder.save_weights = _die
"""


# --------------------------------------------------------------------------- fixtures


def _small_cfg(model_dir: Path, corpora: dict, cache_root: Path, **train) -> dict:
    """10 sequences in 5 shards of 2: enough shards to kill between, seconds to build."""
    d = tiny_config(model_dir, corpora, cache_root, data={"max_train_sequences": 4, "max_val_sequences": 1},
                    teacher={"rows_per_shard": 2})
    if train:
        d["train"] = train
    return d


def _train_section(out_dir: Path, **over) -> dict:
    return {"global_batch": 4, "micro_batch": 2, "max_steps": 6, "eval_every": 2, "save_every": 1, "lr": 1e-3,
            "out_dir": str(out_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
            **over}


@pytest.fixture(scope="module")
def small(tiny_model_dir, tmp_path_factory):
    """A reference cache built without interruption, and the config (dict) that names it."""
    root = tmp_path_factory.mktemp("faults-small")
    corpora = {"med": write_jsonl(root / "med.jsonl", MED), "gen": write_jsonl(root / "gen.jsonl", GEN)}
    d = _small_cfg(tiny_model_dir, corpora, root / "ref-caches")
    ref_dir, status = run_teacher_pass(load_config(data=d))
    assert status == "built"
    ref = _ref_shards(ref_dir)
    assert len(ref) >= 4
    return {"root": root, "corpora": corpora, "cfg": d, "ref_dir": ref_dir, "ref": ref, "model": tiny_model_dir}


@pytest.fixture(scope="module")
def full(tiny_model_dir, tmp_path_factory):
    """The whole tiny corpora (13 shards, ~10 s per pass): room for kills to land anywhere."""
    root = tmp_path_factory.mktemp("faults-full")
    corpora = {"med": write_jsonl(root / "med.jsonl", MED), "gen": write_jsonl(root / "gen.jsonl", GEN)}
    d = tiny_config(tiny_model_dir, corpora, root / "ref-caches")
    ref_dir, _ = run_teacher_pass(load_config(data=d))
    ref = _ref_shards(ref_dir)
    # one uninterrupted CLI run: its length scales the random kill delays, and its shards must
    # equal the in-process build's (the comparison every trial relies on)
    cfg_path, cache_dir = _fresh_teacher_cfg(d, root, "cli-ref")
    t0 = time.monotonic()
    rc, out = _run("stages.teacher_cache", [cfg_path], root / "cli-ref.log")
    assert rc == 0, out[-3000:]
    _assert_complete_like(cache_dir, ref)
    return {"root": root, "corpora": corpora, "cfg": d, "ref_dir": ref_dir, "ref": ref, "model": tiny_model_dir,
            "seconds": time.monotonic() - t0}


def _fresh_teacher_cfg(base: dict, tmp: Path, name: str) -> tuple[Path, Path]:
    """The base config with its own cache_root: returns (config file, the cache folder it names)."""
    d = json.loads(json.dumps(base))
    d["teacher"]["cache_root"] = str(tmp / name)
    cfg_path = _write_yaml(tmp / f"{name}.yaml", d)
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
            rc, _ = _run("stages.teacher_cache", [cfg_path], log, _pre_kill_in_shard_write(rng.randint(1, 3), 0.5))
            assert rc == -signal.SIGKILL
            killed = True
        elif mode == "before_rename":  # a complete temp shard, killed before its rename
            rc, _ = _run("stages.teacher_cache", [cfg_path], log, _pre_kill_in_shard_write(rng.randint(1, 3), 1.0))
            assert rc == -signal.SIGKILL
            killed = True
        elif mode == "shard":          # right after the k-th shard appears (k = 0: model loaded, none yet)
            have = len(_shards(cache_dir)) if cache_dir.is_dir() else 0
            k = rng.randint(have + 1 if have else 0, n)
            proc = _spawn("stages.teacher_cache", [cfg_path], log)
            cond = ((lambda: (cache_dir / "config.yaml").exists()) if k == 0
                    else (lambda: len(_shards(cache_dir)) >= k if cache_dir.is_dir() else False))
            killed = _kill_when(proc, cond)
        else:                          # after a seeded delay: start-up, packing, shards or manifest
            proc = _spawn("stages.teacher_cache", [cfg_path], log)
            killed = _kill_after(proc, rng.uniform(0.05, 1.0) * setup.get("seconds", 10.0))
        state = _check_cache_state(cache_dir, ref)
        seen.append({"mode": mode, "killed": killed, **state})

    one_kill(mode, f"t{seed}-1")
    if second_kill and not seen[-1]["manifest"] and seen[-1]["shards"] < n:
        one_kill("shard", f"t{seed}-2")
    if resume_in_process:
        _, status = run_teacher_pass(load_config(cfg_path))
    else:
        rc, out = _run("stages.teacher_cache", [cfg_path], tmp / f"t{seed}-final.log")
        assert rc == 0, out[-3000:]
    _assert_complete_like(cache_dir, ref)
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
        assert not _shards(cache_dir)
    _, status = run_teacher_pass(load_config(cfg_path))
    assert status == "built"
    _assert_complete_like(cache_dir, small["ref"])


@faults
def test_two_teacher_processes_at_once(small, tmp_path):
    cfg_path, cache_dir = _fresh_teacher_cfg(small["cfg"], tmp_path, "race")
    # the first pass is slowed so it still holds the lock when the second arrives
    first = _spawn("stages.teacher_cache", [cfg_path], tmp_path / "first.log", _pre_slow_shards(1.5))
    t0 = time.monotonic()
    while not _shards(cache_dir):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() - t0 < 120
        time.sleep(0.01)
    rc, out = _run("stages.teacher_cache", [cfg_path], tmp_path / "second.log")
    assert first.poll() is None, "the first pass ended before the second reached the lock: test too slow"
    assert rc == 2, out[-3000:]
    assert "another teacher pass is writing this cache (lock held)" in out
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    _assert_complete_like(cache_dir, small["ref"])


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


# (id, corruption, cache_info exit code, text in cache_info's output, text in the training error)
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
]


def _corrupt_copy(small, tmp: Path, case) -> Path:
    """A copy of the reference cache root (units and set) with one corruption; returns its set folder."""
    root = tmp / "cache"
    shutil.copytree(small["ref_dir"].parent.parent, root)
    d = root / C.SETS_DIR / small["ref_dir"].name
    case[1](d)
    return d


def _train_cfg_on(small, cache_dir: Path, tmp: Path, **over) -> dict:
    return {**small["cfg"], "train": _train_section(tmp / "runs", cache_dir=str(cache_dir), **over)}


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
    assert not (tmp_path / "runs").exists(), "training started on a bad cache"


@faults
@pytest.mark.parametrize("case", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_cache_is_refused_cli(small, tmp_path, case):
    d = _corrupt_copy(small, tmp_path, case)
    rc, out = _run("stages.cache_info", ["--path", d], tmp_path / "info.log")
    assert rc == case[2] and case[3] in out, out[-3000:]
    cfg = _write_yaml(tmp_path / "train.yaml", _train_cfg_on(small, d, tmp_path))
    rc, out = _run("stages.train", [cfg, "train.run_name=x"], tmp_path / "train.log")
    assert rc == 2 and case[4] in out, out[-3000:]
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- 4. Stage 2 SIGKILL


@pytest.fixture(scope="module")
def ref_run(small):
    """An uninterrupted 6-step run, checkpointing every step, on the small cache."""
    d = {**small["cfg"], "train": _train_section(small["root"] / "runs", run_name="ref")}
    return train(load_config(data=d))


def _train_cfg_file(small, tmp: Path) -> tuple[Path, Path]:
    d = {**small["cfg"], "train": _train_section(tmp / "runs")}
    return _write_yaml(tmp / "train.yaml", d), tmp / "runs" / "x"


def _watch_checkpoints(proc: subprocess.Popen, run_dir: Path, kill_at: str | None) -> tuple[bool, int]:
    """Poll `latest` while the trainer runs; every name it ever shows must load. SIGKILL once it
    names `kill_at`. Returns (killed, how many distinct `latest` values were loaded)."""
    latest, seen = run_dir / "checkpoints" / "latest", set()
    t0 = time.monotonic()
    while proc.poll() is None:
        assert time.monotonic() - t0 < 300
        name = latest.read_text().strip() if latest.is_file() else None
        if name and name not in seen:
            try:
                state = torch.load(latest.parent / name / "state.pt", weights_only=False)
            except (OSError, RuntimeError, EOFError):
                # pruned between our read of `latest` and the load: only a failure if it still names it
                if latest.read_text().strip() == name:
                    raise
            else:
                assert f"step-{state['step']:06d}" == name
                seen.add(name)
        if name is not None and name == kill_at:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True, len(seen)
        time.sleep(0.005)
    return False, len(seen)


def _after_kill_checks(run_dir: Path) -> str | None:
    if not (run_dir / "checkpoints" / "latest").is_file():
        return None
    name, state = _latest_state(run_dir)
    assert name == f"step-{state['step']:06d}"
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())
    return name


def test_train_sigkill_resumes_identically(small, ref_run, tmp_path):
    cfg_path, run_dir = _train_cfg_file(small, tmp_path)
    proc = _spawn("stages.train", [cfg_path, "train.run_name=x"], tmp_path / "kill.log")
    killed, loaded = _watch_checkpoints(proc, run_dir, "step-000002")
    assert killed, (tmp_path / "kill.log").read_text()[-3000:]
    assert _after_kill_checks(run_dir) >= "step-000002"
    assert not (run_dir / "summary.json").exists()
    train(load_config(cfg_path, ["train.run_name=x", "train.resume=true"]))
    _assert_same_metrics(_metrics(ref_run), _metrics(run_dir))


# kill points: after the k-th checkpoint appears (0: before any checkpoint, once metrics exist;
# 6: after the last one, while the final validation and outputs are written), or self-inflicted
STAGE2_KILLS = ["ckpt-0", "ckpt-1", "ckpt-3", "ckpt-5", "ckpt-6", "in-checkpoint-3", "torn-metrics-4", "in-outputs-6"]


@faults
@pytest.mark.parametrize("kill", STAGE2_KILLS)
def test_train_sigkill_sweep(small, ref_run, tmp_path, kill):
    cfg_path, run_dir = _train_cfg_file(small, tmp_path)
    args = [cfg_path, "train.run_name=x"]
    log = tmp_path / "kill.log"
    if kill.startswith("ckpt-"):
        k = int(kill.split("-")[1])
        proc = _spawn("stages.train", args, log)
        if k == 0:
            killed = _kill_when(proc, lambda: (run_dir / "metrics.jsonl").is_file(), every=0.001)
        else:
            killed, _ = _watch_checkpoints(proc, run_dir, f"step-{k:06d}")
        assert killed, log.read_text()[-3000:]
    else:
        step = int(kill.rsplit("-", 1)[1])
        pre = {"in-checkpoint": _pre_kill_in_checkpoint, "torn-metrics": _pre_torn_metrics_line,
               "in-outputs": _pre_kill_in_outputs}[kill.rsplit("-", 1)[0]](step)
        rc, out = _run("stages.train", args, log, pre)
        assert rc == -signal.SIGKILL, out[-3000:]
    _after_kill_checks(run_dir)
    rc, out = _run("stages.train", args + ["train.resume=true"], tmp_path / "resume.log")
    assert rc == 0, out[-3000:]
    _assert_same_metrics(_metrics(ref_run), _metrics(run_dir))
    assert not list((run_dir / "checkpoints").glob(".tmp*")), "a killed checkpoint's temp folder was left behind"


# --------------------------------------------------------------------------- 5. malformed corpora


def _lines(*recs) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in recs)


GOOD = {"text": "A good first record about the kidney."}


def _zst_frames(*recs, per_frame: int = 1) -> bytes:
    import zstandard

    lines = [_lines(r) for r in recs]
    return b"".join(zstandard.ZstdCompressor().compress(b"".join(lines[i:i + per_frame]))
                    for i in range(0, len(lines), per_frame))


def _parquet_bytes_with_invalid_utf8() -> bytes:
    """A string column whose second value is not UTF-8 (a foreign writer: pyarrow's own builders
    refuse it, so the buffers are laid down by hand)."""
    import io

    import pyarrow as pa

    data = b"A good first record." + b"caf\xe9 au lait" + b"A good third record."
    offsets = np.array([0, 20, 33, len(data)], dtype=np.int32)
    col = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": col}), buf)
    return buf.getvalue()


# (id, file name, what to put there, extra source settings (its "data" entry: data section settings),
# expected text; {path} is the file)
CORPUS_CASES = [
    ("invalid-json", "bad.jsonl", _lines(GOOD, b'{"text": "x",}'), {},
     "{path}:2: invalid JSON (Expecting property name enclosed in double quotes; column 14)"),
    ("missing-text", "bad.jsonl", _lines(GOOD, {"title": "no body"}), {},
     "{path}:2: no 'text', 'messages' or 'question'/'answer' field (keys: ['title'])"),
    ("empty-text", "bad.jsonl", _lines(GOOD, {"text": "   "}), {}, "{path}:2: field 'text' is empty"),
    ("text-not-a-string", "bad.jsonl", _lines(GOOD, {"text": 42}), {},
     "{path}:2: field 'text' must be a string, got int"),
    ("record-not-an-object", "bad.jsonl", _lines(GOOD, [1, 2]), {},
     "{path}:2: a record must be a JSON object, got list"),
    ("messages-wrong-type", "bad.jsonl", _lines(GOOD, {"messages": "hi"}), {},
     "{path}:2: 'messages' must be a non-empty list"),
    ("answer-missing", "bad.jsonl", _lines(GOOD, {"question": "Why?"}), {},
     "{path}:2: field 'answer' must be a string, got NoneType"),
    ("invalid-utf8", "bad.jsonl", _lines(GOOD, b'{"text": "caf\xe9"}'), {}, "{path}:2: invalid UTF-8 at byte 13"),
    ("empty-file", "bad.jsonl", b"", {}, "{path}: no usable records (corpus domain, subset med)"),
    ("blank-lines-only", "bad.jsonl", b"\n  \n\n", {}, "{path}: no usable records (corpus domain, subset med)"),
    ("missing-file", "absent.jsonl", None, {}, "{path}: source file does not exist (corpus domain, subset med)"),
    ("directory-not-file", "dir.jsonl", "DIR", {"format": "jsonl"}, "{path}: cannot read (Is a directory)"),
    ("directory-auto-format", "dir.jsonl", "DIR", {}, "{path}: not a datasets folder saved with save_to_disk"),
    ("unreadable-chmod-000", "locked.jsonl", "CHMOD000", {}, "{path}: cannot read (Permission denied)"),
    ("bad-zstd", "bad.jsonl.zst", b"this is not zstd", {}, "{path}: not a valid zstd stream"),
    ("bad-parquet", "bad.parquet", b"PAR1 not really", {}, "{path}: not a readable Parquet file"),
    ("lone-surrogate", "bad.jsonl", _lines(GOOD, b'{"text": "abc \\ud800 def"}'), {},
     "{path}:2: invalid Unicode: lone surrogate \\ud800 (half of a UTF-16 pair; UTF-8 cannot encode it)"),
    ("lone-surrogate-in-answer", "bad.jsonl", _lines(GOOD, b'{"question": "Why?", "answer": "\\udc00"}'), {},
     "{path}:2: invalid Unicode: lone surrogate \\udc00"),
    ("invalid-utf8-parquet", "bad.parquet", _parquet_bytes_with_invalid_utf8(), {},
     "{path}:row 2: invalid UTF-8 in column 'text' (byte 3 of a string)"),
    ("truncated-zstd", "bad.jsonl.zst", _zst_frames(GOOD, GOOD, GOOD)[:-3], {},
     "{path}: the zstd stream ends in the middle of a frame (truncated file?) after 2 complete lines"),
    ("truncated-zstd-skip-mode", "bad.jsonl.zst", _zst_frames(GOOD, GOOD, GOOD)[:-3],
     {"data": {"on_bad_record": "skip"}}, "{path}: the zstd stream ends in the middle of a frame (truncated file?)"),
    ("unknown-corpus-tag", "good.jsonl", _lines(GOOD), {"corpus": "medical"},
     "data.sources[0]: corpus 'medical' is not one of ['domain', 'general']"),
]


def _corpus_case(small, tmp: Path, case) -> tuple[Path, str, Path]:
    cid, name, content, extra, expected = case
    if content == "CHMOD000" and os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not block reads (directory-not-file covers OS errors)")
    path = tmp / name
    if content == "DIR":
        path.mkdir()
        (path / "part.jsonl").write_bytes(_lines(GOOD))
    elif content == "CHMOD000":
        path.write_bytes(_lines(GOOD))
        path.chmod(0)
    elif content is not None:
        path.write_bytes(content)
    d = json.loads(json.dumps(small["cfg"]))
    d["teacher"]["cache_root"] = str(tmp / "caches")
    extra = dict(extra)
    d["data"].update(extra.pop("data", {}))
    d["data"]["sources"][0] = {**d["data"]["sources"][0], "path": str(path), **extra}
    return _write_yaml(tmp / "cfg.yaml", d), expected.format(path=path), tmp / "caches"


@pytest.mark.parametrize("case", CORPUS_CASES, ids=[c[0] for c in CORPUS_CASES])
def test_malformed_corpus(small, tmp_path, capsys, case):
    from stages import teacher_cache

    cfg_path, expected, caches = _corpus_case(small, tmp_path, case)
    rc = teacher_cache.main([str(cfg_path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expected in err, err
    assert not list(caches.glob("*/shard-*")) and not list(caches.glob("*/" + C.MANIFEST))


@faults
@pytest.mark.parametrize("case", CORPUS_CASES, ids=[c[0] for c in CORPUS_CASES])
def test_malformed_corpus_cli(small, tmp_path, case):
    cfg_path, expected, caches = _corpus_case(small, tmp_path, case)
    rc, out = _run("stages.teacher_cache", [cfg_path], tmp_path / "out.log")
    assert rc == 2 and expected in out, out[-3000:]
    assert "Traceback" not in out
    assert not list(caches.glob("*/shard-*"))


# --------------------------------------------------------------------------- 6. bad configs


BAD_CONFIG = {
    "model": {"colour": "red"},
    "data": {"max_seq_len": 1},
    "teacher": {"top_k": "five", "batch_sise": 2, "rows_per_shard": 0},
    "train": {"alpha": 1.5, "general_ratio": 0, "lr": "fast", "warmup_ratio": 1.0, "micro_batch": 3},
}
BAD_OVERRIDES = ["train.zz=1", "data.val_fraction=1.5"]
# type errors and value errors in the same section: all of them in one run
BAD_CONFIG_PROBLEMS = [
    "model.colour: unknown key", "data.max_seq_len must be >= 2",
    "data.val_fraction must be in (0, 1), got 1.5", "teacher.top_k: expected an integer, got 'five'",
    "teacher.batch_sise: unknown key", "teacher.rows_per_shard must be >= 1, got 0",
    "train.lr: expected a number, got 'fast'", "train.zz: unknown key", "train.alpha must be in [0, 1], got 1.5",
    "train.general_ratio must be > 0, got 0", "train.warmup_ratio must be in [0, 1), got 1.0",
    "train.global_batch (4) must be a multiple of train.micro_batch (3)",
]


def _bad_cfg(small, tmp: Path, section: dict, overrides=()) -> tuple[Path, list[str]]:
    d = json.loads(json.dumps(small["cfg"]))
    d["teacher"]["cache_root"] = str(tmp / "caches")
    d["train"] = _train_section(tmp / "runs")
    for k, v in section.items():
        d.setdefault(k, {}).update(v)
    return _write_yaml(tmp / "bad.yaml", d), list(overrides)


@pytest.mark.parametrize("stage", ["teacher_cache", "train"])
def test_bad_config_lists_every_problem(small, tmp_path, capsys, stage):
    import importlib

    main = importlib.import_module(f"stages.{stage}").main
    cfg, ov = _bad_cfg(small, tmp_path, BAD_CONFIG, BAD_OVERRIDES)
    assert main([str(cfg)] + ov) == 2
    err = capsys.readouterr().err
    missing = [p for p in BAD_CONFIG_PROBLEMS if p not in err]
    assert not missing, err
    assert not (tmp_path / "caches").exists() and not (tmp_path / "runs").exists()


def test_top_k_not_below_vocab_fails_before_any_work(small, tmp_path, capsys):
    from stages import teacher_cache

    cfg, _ = _bad_cfg(small, tmp_path, {"teacher": {"top_k": 49152}})
    t0 = time.monotonic()
    assert teacher_cache.main([str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "teacher.top_k = 49152 must be < the model's vocabulary size 49152" in err, err
    assert not (tmp_path / "caches").exists(), "the cache folder was created before the check"
    assert time.monotonic() - t0 < 30


@faults
@pytest.mark.parametrize("stage", ["teacher_cache", "train"])
def test_bad_config_cli(small, tmp_path, stage):
    cfg, ov = _bad_cfg(small, tmp_path, BAD_CONFIG, BAD_OVERRIDES)
    rc, out = _run(f"stages.{stage}", [cfg] + ov, tmp_path / "a.log")
    assert rc == 2 and not [p for p in BAD_CONFIG_PROBLEMS if p not in out], out[-3000:]
    assert "Traceback" not in out
    if stage == "teacher_cache":
        cfg, _ = _bad_cfg(small, tmp_path, {"teacher": {"top_k": 49152}})
        rc, out = _run(f"stages.{stage}", [cfg], tmp_path / "c.log")
        assert rc == 2 and "must be < the model's vocabulary size 49152" in out, out[-3000:]
        assert "Traceback" not in out
    assert not (tmp_path / "caches").exists() and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- 7. numerics


def _poison_step(monkeypatch, step: int, accum: int, how: str) -> None:
    """Make the training loss (`how="loss"`) or only its gradient (`how="grad"`) NaN at `step`."""
    import mol.train as T

    real, calls = T.micro_batch_loss, {"n": 0}

    def poisoned(*a, **kw):
        out = real(*a, **kw)
        calls["n"] += 1
        if (calls["n"] - 1) // accum + 1 != step:
            return out
        if how == "loss":
            return out._replace(loss_sum=out.loss_sum * float("nan"))
        # sqrt'(0) = inf: the value is unchanged, the gradient becomes 0 * inf = NaN
        return out._replace(loss_sum=out.loss_sum + torch.sqrt(out.loss_sum * 0))

    monkeypatch.setattr(T, "micro_batch_loss", poisoned)


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_non_finite_stops_training_and_keeps_last_good_checkpoint(small, tmp_path, monkeypatch, how):
    _poison_step(monkeypatch, step=3, accum=2, how=how)
    d = {**small["cfg"], "train": _train_section(tmp_path / "runs", run_name="nan")}
    with pytest.raises(TrainingError, match="non-finite") as e:
        train(load_config(data=d))
    assert "step 3" in str(e.value)
    run_dir = tmp_path / "runs" / "nan"
    name, state = _latest_state(run_dir)
    assert name == "step-000002" and state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())
    assert not (run_dir / "checkpoints" / "step-000003").exists()
    assert [r["step"] for r in _metrics(run_dir) if r["type"] == "train"] == [1, 2]


@pytest.mark.parametrize("via", ["encode_labels", "raw codes"])
def test_degenerate_teacher_rows_give_finite_loss_and_grads(tmp_path, via):
    """Rows a cache can hold at the extremes: top-1 prob exactly 1 with residual 0, all mass in
    the residual, quantisation that makes the buckets sum past 1, and zeros everywhere: as Stage 1
    writes them (encode_labels never stores a zero code) and as raw codes (zeros included)."""
    k, vocab, L = 4, 64, 6
    extremes = [
        ([1.0, 0.0, 0.0, 0.0], 0.0),
        ([0.0, 0.0, 0.0, 0.0], 1.0),
        ([0.9999, 0.001, 0.0, 0.0], 0.0),   # the buckets sum past 1 (the first code rounds to 1.0)
        ([0.0, 0.0, 0.0, 0.0], 0.0),         # nothing anywhere (a broken row must not give NaN either)
    ]
    gaps, codes, res = [], [], []
    for p, r in extremes:
        ids, p, r = np.array([[1, 2, 3, 4]] * (L - 1)), np.array([p] * (L - 1)), np.full(L - 1, r)
        if via == "encode_labels":
            g, c, rc = C.encode_labels(ids, p, r, vocab)
        else:  # the extreme codes: probability 0, residual at its floor (1e-30) or 1
            g = np.diff(ids, axis=1, prepend=0).astype(np.uint16)
            c = np.rint(np.sqrt(p) * C.PROB_LEVELS).astype(np.uint16)
            rc = np.full(L - 1, C.RESIDUAL_LEVELS if r[0] == 0 else 0, np.uint16)
        gaps.append(g)
        codes.append(c)
        res.append(rc)
    n = len(extremes)
    for corpus, rows in (("domain", [0, 2]), ("general", [1, 3])):
        d = C.ShardData(seq_id=np.array(rows), corpus=corpus, subset="s", split=["train"] * 2,
                        input_ids=np.tile(np.arange(1, L + 1), 2).astype(np.uint16), tok_off=np.array([0, L, 2 * L]),
                        topk_ids=np.concatenate([gaps[i] for i in rows]), topk_probs=np.concatenate([codes[i] for i in rows]),
                        residual=np.concatenate([res[i] for i in rows]))
        C.write_shard(tmp_path / C.shard_name(0, 0 if corpus == "domain" else 1), C.shard_table(d, k, vocab), 3)
    unit = C.CacheUnit.from_manifest(tmp_path, {"key": {"top_k": k}, "shards": [
        {"file": C.shard_name(0, 0)}, {"file": C.shard_name(0, 1)}]})
    seqs = unit.load("train")
    assert len(seqs) == n
    assert float(C.decode_residual(seqs.teacher_residual).min()) == np.float32(1e-30)
    assert float(C.decode_probs(seqs.teacher_topk_probs).max()) == 1.0
    b = collate([seqs.row(i) for i in range(len(seqs))], k, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e3, 1e5):  # from a flat to a completely saturated student
        hidden = (torch.randn(n, L - 1, 8, generator=g) * scale).requires_grad_()
        weight = torch.randn(vocab, 8, generator=g).requires_grad_()
        out = chunked_mol_loss(hidden, weight, b["target_ids"], b["mask"], b[C.TOPK_IDS], b[C.TOPK_PROBS],
                               b[C.RESIDUAL], torch.full((n,), 0.5), torch.ones(n), chunk_size=7)
        out.loss_sum.backward()
        assert torch.isfinite(out.loss_sum) and torch.isfinite(out.kl).all() and (out.kl > -1e-5).all(), scale
        assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all(), scale


# --------------------------------------------------------------------------- 8. disk full


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

        monkeypatch.setattr(C.pq, "write_table", fail)
    else:
        real = os.replace

        def fail(src, dst, *a, **kw):
            if str(dst).endswith(".parquet"):
                if next(counter) == n:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real(src, dst, *a, **kw)

        monkeypatch.setattr(C.os, "replace", fail)


@pytest.mark.parametrize("where", ["write", "rename"])
def test_disk_full_while_writing_a_shard(small, tmp_path, monkeypatch, capsys, where):
    from stages import teacher_cache

    cfg_path, cache_dir = _fresh_teacher_cfg(small["cfg"], tmp_path, "full")
    _full_disk_on(monkeypatch, 2, where)
    assert teacher_cache.main([str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "shard-00000-00001.parquet" in err and "No space left on device" in err, err
    state = _check_cache_state(cache_dir, small["ref"])
    assert state == {"shards": 1, "tmp": False, "manifest": False}
    monkeypatch.undo()
    _, status = run_teacher_pass(load_config(cfg_path))
    assert status == "resumed"
    _assert_complete_like(cache_dir, small["ref"])


def test_disk_full_while_writing_the_manifest(small, tmp_path, monkeypatch):
    cfg_path, cache_dir = _fresh_teacher_cfg(small["cfg"], tmp_path, "full")
    real = os.replace

    def fail(src, dst, *a, **kw):
        if str(dst).endswith(C.MANIFEST):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(C.os, "replace", fail)
    with pytest.raises(C.CacheError, match=C.MANIFEST):
        run_teacher_pass(load_config(cfg_path))
    unit0 = [n for n in small["ref"] if n.startswith(next(iter(small["ref"])).split("/")[0] + "/")]
    assert _check_cache_state(cache_dir, small["ref"]) == {"shards": len(unit0), "tmp": False, "manifest": False}
    monkeypatch.undo()
    assert run_teacher_pass(load_config(cfg_path))[1] == "resumed"
    _assert_complete_like(cache_dir, small["ref"])


@faults
def test_disk_full_cli(small, tmp_path):
    cfg_path, cache_dir = _fresh_teacher_cfg(small["cfg"], tmp_path, "full")
    rc, out = _run("stages.teacher_cache", [cfg_path], tmp_path / "a.log", _pre_disk_full(2))
    assert rc == 2 and "shard-00000-00001.parquet" in out and "No space left on device" in out, out[-3000:]
    assert "Traceback" not in out
    assert _check_cache_state(cache_dir, small["ref"]) == {"shards": 1, "tmp": False, "manifest": False}
    rc, out = _run("stages.teacher_cache", [cfg_path], tmp_path / "b.log")
    assert rc == 0 and "teacher cache resumed" in out, out[-3000:]
    _assert_complete_like(cache_dir, small["ref"])


# --------------------------------------------------------------------------- 9. Stage 2: nothing wrong accepted
# Each case through the real CLI: exit 2, a message naming the key, file or step, no traceback; the
# run folder keeps its last good state and a resume from it reproduces the uninterrupted run.


def _pre_overflow_at(step: int) -> str:
    """The optimizer's update at `step` leaves an infinity in a weight (loss and gradients finite)."""
    return f"""
import torch
_real, _n = torch.optim.AdamW.step, [0]
def _step(self, *a, **kw):
    out = _real(self, *a, **kw)
    _n[0] += 1
    if _n[0] == {step}:
        with torch.no_grad():
            self.param_groups[0]["params"][-1].view(-1)[0] = float("inf")
    return out
torch.optim.AdamW.step = _step
"""


def _pre_disk_full_in_checkpoint(step: int) -> str:
    return f"""
import errno, torch
_real = torch.save
def _save(obj, f, *a, **kw):
    if isinstance(obj, dict) and obj.get("step") == {step}:
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return _real(obj, f, *a, **kw)
torch.save = _save
"""


@faults
@pytest.mark.parametrize("case", ["non-finite-weights", "disk-full-checkpoint"])
def test_stage2_stops_cleanly_and_resumes_identically_cli(small, ref_run, tmp_path, case):
    cfg_path, run_dir = _train_cfg_file(small, tmp_path)
    args = [cfg_path, "train.run_name=x"]
    pre = _pre_overflow_at(3) if case == "non-finite-weights" else _pre_disk_full_in_checkpoint(3)
    rc, out = _run("stages.train", args, tmp_path / "a.log", pre)
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    assert ("non-finite weights" if case == "non-finite-weights" else "No space left on device") in out, out[-3000:]
    name, state = _latest_state(run_dir)
    assert name == "step-000002" and all(torch.isfinite(v).all() for v in state["trainable"].values())
    assert str(run_dir / "checkpoints" / name) in out
    assert not list((run_dir / "checkpoints").glob(".tmp*")) and not (run_dir / "adapter").exists()
    rc, out = _run("stages.train", args + ["train.resume=true"], tmp_path / "resume.log")
    assert rc == 0, out[-3000:]
    _assert_same_metrics(_metrics(ref_run), _metrics(run_dir))


@faults
def test_two_trainers_on_one_run_folder_cli(small, tmp_path):
    """Started together on one run name: exactly one trains, the other exits 2 naming the lock;
    every metrics line is written once."""
    cfg_path, run_dir = _train_cfg_file(small, tmp_path)
    procs = [_spawn("stages.train", [cfg_path, "train.run_name=x"], tmp_path / f"{i}.log") for i in range(2)]
    rcs = sorted(p.wait(timeout=300) for p in procs)
    logs = "\n".join((tmp_path / f"{i}.log").read_text() for i in range(2))
    assert rcs == [0, 2], logs[-3000:]
    assert "another trainer is writing this run folder" in logs or "already holds a run" in logs, logs[-3000:]
    assert "Traceback" not in logs
    steps = [(r["type"], r["step"]) for r in _metrics(run_dir)]
    assert len(steps) == len(set(steps)) and ("train", 6) in steps


@faults
def test_a_resume_with_changed_settings_is_refused_cli(small, tmp_path):
    cfg_path, run_dir = _train_cfg_file(small, tmp_path)
    rc, out = _run("stages.train", [cfg_path, "train.run_name=x", "train.max_steps=2"], tmp_path / "a.log")
    assert rc == 0, out[-3000:]
    before = {p: (run_dir / p).read_bytes() for p in ("config.yaml", "metrics.jsonl")}
    rc, out = _run("stages.train", [cfg_path, "train.run_name=x", "train.resume=true", "train.max_steps=4",
                                    "train.general_ratio=2", "model.dtype=bfloat16"], tmp_path / "b.log")
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    for line in ("train.max_steps: 2 -> 4", "train.general_ratio: 1.0 -> 2.0", "model.dtype: 'auto' -> 'bfloat16'"):
        assert line in out, out[-3000:]
    assert {p: (run_dir / p).read_bytes() for p in before} == before
    rc, out = _run("stages.train", [cfg_path, "train.resume=true"], tmp_path / "c.log")
    assert rc == 2 and "train.resume=true needs train.run_name" in out, out[-3000:]


# every numeric field with a value it must refuse, all in one run per stage: each is named, exit 2,
# nothing created (the stage never reaches its first file)
BAD_NUMBERS = [
    "train.lr=.nan", "train.lr=.inf", "train.lr=2", "train.alpha=.nan", "train.general_ratio=.inf",
    "train.weight_decay=-0.1", "train.warmup_ratio=.nan", "train.min_lr_ratio=-0.5", "train.epochs=-.inf",
    "train.grad_clip=.nan", "train.seed=-1", "train.eval_every=-1", "train.save_every=-2",
    "train.lora.alpha=0", "train.lora.dropout=.nan", "data.val_fraction=0", "teacher.zstd_level=0",
    "eval.batch_size=0", "train.run_name=../outside", "model.device=gpu",
]
BAD_NUMBER_KEYS = ["train.lr", "train.alpha", "train.general_ratio", "train.weight_decay", "train.warmup_ratio",
                   "train.min_lr_ratio", "train.epochs", "train.grad_clip", "train.seed", "train.eval_every",
                   "train.save_every", "train.lora.alpha", "train.lora.dropout", "data.val_fraction",
                   "teacher.zstd_level", "eval.batch_size", "train.run_name", "model.device"]


@faults
@pytest.mark.parametrize("stage", ["teacher_cache", "train"])
def test_every_bad_number_is_refused_before_any_work_cli(small, tmp_path, stage):
    cfg_path, _ = _train_cfg_file(small, tmp_path)
    d = yaml.safe_load(cfg_path.read_text())
    d["teacher"]["cache_root"] = str(tmp_path / "caches")
    _write_yaml(cfg_path, d)
    rc, out = _run(f"stages.{stage}", [cfg_path, *BAD_NUMBERS], tmp_path / "a.log")
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    missing = [k for k in BAD_NUMBER_KEYS if k not in out]
    assert not missing, (missing, out[-3000:])
    assert not (tmp_path / "caches").exists() and not (tmp_path / "runs").exists()


@faults
@pytest.mark.parametrize("name", ["smollm2-135m-instruc", "HuggingFaceTB/SmolLM2-135M-Instruc", "my model"])
def test_a_mistyped_model_name_cli(small, tmp_path, name):
    """A typo in model.name: exit 2 saying where MoL looked, before any cache folder exists."""
    cfg_path, _ = _train_cfg_file(small, tmp_path)
    d = yaml.safe_load(cfg_path.read_text())
    d["teacher"]["cache_root"] = str(tmp_path / "caches")
    _write_yaml(cfg_path, d)
    offline = "import os\nos.environ['HF_HUB_OFFLINE'] = '1'\n"  # this machine has no hub; CI neither
    for stage in ("teacher_cache", "train"):
        rc, out = _run(f"stages.{stage}", [cfg_path, f"model.name={name}"], tmp_path / f"{stage}.log", offline)
        assert rc == 2 and "Traceback" not in out, out[-3000:]
        assert f"model {name!r}: no such local folder or hub id" in out, out[-3000:]
    assert not (tmp_path / "caches").exists() and not (tmp_path / "runs").exists()
