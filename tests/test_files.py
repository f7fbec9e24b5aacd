"""The file primitives (mol/files.py) and the guarantees built on them: every rename a stage makes
survives a power loss (its data fsynced before, its folder fsynced after), and `cache_info --gc`
holds a folder's lock until the folder is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from mol import cache as C
from mol.config import load_config
from mol.files import try_lock, write_atomic
from mol.teacher import run_teacher_pass

# --------------------------------------------------------------------------- durable renames


def _real(p) -> str:
    """The path a descriptor's readlink gives for it: the folder resolved (tmp_path may be a link)."""
    p = os.fspath(p)
    return os.path.join(os.path.realpath(os.path.dirname(p)), os.path.basename(p))


def record_disk(monkeypatch) -> list:
    """Every fsync (the path its descriptor names) and every rename (with the files it moved), in
    order: what a power loss could undo is read from it by `undurable`."""
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def renamer(real):
        def rename(src, dst, *a, **kw):
            real(src, dst, *a, **kw)
            moved = ([os.path.relpath(os.path.join(r, n), dst) for r, ds, fs in os.walk(dst) for n in ds + fs]
                     if os.path.isdir(dst) else None)
            events.append(("rename", _real(src), _real(dst), moved))
        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", renamer(real_replace))
    monkeypatch.setattr(os, "rename", renamer(real_rename))
    return events


@pytest.fixture
def disk_log(monkeypatch) -> list:
    return record_disk(monkeypatch)


def undurable(events: list) -> list[str]:
    """Renames a power loss could undo or tear: data (a file, or everything in a folder) not fsynced
    before the rename, or the destination's folder not fsynced after it."""
    problems = []
    for i, ev in enumerate(events):
        if ev[0] != "rename":
            continue
        _, src, dst, moved = ev
        before = {e[1] for e in events[:i] if e[0] == "fsync"}
        after = {e[1] for e in events[i + 1:] if e[0] == "fsync"}
        if os.path.dirname(dst) not in after:
            problems.append(f"{dst}: its folder never fsynced after the rename")
        for rel in ([""] + moved if moved is not None else [""]):
            if os.path.normpath(os.path.join(src, rel)) not in before:
                problems.append(f"{dst}: {os.path.join(src, rel)} not fsynced before the rename")
    return problems


def _renamed(events: list) -> list[str]:
    return [Path(e[2]).name for e in events if e[0] == "rename"]


def test_write_atomic_is_durable(tmp_path, disk_log):
    write_atomic(tmp_path / "a.json", b"{}")
    assert _renamed(disk_log) == ["a.json"]
    assert undurable(disk_log) == []


def test_every_rename_of_a_teacher_pass_is_durable(tiny_model_dir, corpora, tmp_path, disk_log):
    """Shards (write_shard), unit and set manifests (write_atomic)."""
    run_teacher_pass(load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path / "caches")))
    names = _renamed(disk_log)
    assert any(n.startswith("shard-") for n in names) and C.MANIFEST in names, names
    assert undurable(disk_log) == []


def test_every_rename_of_a_training_run_is_durable(tiny_model_dir, corpora, tmp_path, monkeypatch):
    """Checkpoints (folders), `latest`, run.json, the adapter folder (saved as a checkpoint is), summary.json."""
    from mol.train import train

    d = tiny_config(tiny_model_dir, corpora, tmp_path / "caches")
    d["train"] = {"global_batch": 4, "micro_batch": 2, "max_steps": 2, "eval_every": 0, "save_every": 1,
                  "out_dir": str(tmp_path / "runs"), "run_name": "r",
                  "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    run_teacher_pass(load_config(data=d))
    events = record_disk(monkeypatch)  # from here on: the trainer's renames only
    train(load_config(data=d))
    assert undurable(events) == []
    names = _renamed(events)
    for name in ("step-000001", "step-000002", "latest", "run.json", "adapter", "summary.json"):
        assert name in names, names


def test_the_default_model_conversion_is_durable(tiny_model_dir, tmp_path, monkeypatch):
    """The converted model folder (mol/model.py), with the GGUF loaders standing in for the tiny model."""
    import transformers

    from mol import model as M

    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(M, "_gguf_path", lambda: tiny_model_dir / "model.gguf")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        staticmethod(lambda *a, **kw: real_model(tiny_model_dir)))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        staticmethod(lambda *a, **kw: real_tok(tiny_model_dir)))
    events = record_disk(monkeypatch)
    target = M.convert_default_model(tmp_path / "converted")
    assert (target / "model.safetensors").is_file() and _renamed(events) == ["converted"]
    assert undurable(events) == []


# --------------------------------------------------------------------------- gc and the teacher's lock

# Run before stages.cache_info in the child: its first "remove <folder>" line waits for the test's
# go file, so the test acts while gc is between deciding to remove a folder and having removed it.
_PAUSE_AT_FIRST_REMOVE = """
import builtins, os, time
_print, _paused = builtins.print, []
def _pausing_print(*a, **kw):
    _print(*a, **kw)
    text = " ".join(map(str, a))
    if text.startswith("remove ") and not _paused:
        _paused.append(1)
        with open({here!r}, "w") as f:
            f.write(text.split()[1])
        while not os.path.exists({go!r}):
            time.sleep(0.01)
builtins.print = _pausing_print
"""


def test_gc_holds_a_folders_lock_until_it_is_gone(tiny_model_dir, corpora, tmp_path, capsys):
    """Two processes each way. A unit whose lock a child process holds is skipped. A teacher pass
    that would resume an unfinished unit while a gc child is removing it is refused (lock held)
    instead of writing into the folder being deleted; a pass after the gc rebuilds a cache that
    verifies. Before: gc released its probe of the lock before rmtree, and the pass went ahead."""
    from faults_kit import run_stage, spawn_stage, write_yaml
    from stages.cache_info import main as cache_info_main

    a = tiny_config(tiny_model_dir, corpora, tmp_path / "caches")
    a_yaml = write_yaml(tmp_path / "a.yaml", a)
    # another k: units and set of its own, so gc with b's config removes every folder of a's
    b_yaml = write_yaml(tmp_path / "b.yaml", {**a, "teacher": {**a["teacher"], "top_k": 4}})
    cache_dir, _ = run_teacher_pass(load_config(a_yaml))
    units = sorted(p for p in (cache_dir.parent.parent / C.UNITS_DIR).iterdir())
    assert len(units) == 2

    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\nsys.stdin.read()", str(units[0] / ".lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cache_info_main(["--gc", str(b_yaml), "--yes"]) == 0
        out = capsys.readouterr().out
        assert f"skip   {units[0]}" in out and f"remove {units[1]}" in out, out
        assert units[0].is_dir() and not units[1].exists() and not cache_dir.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)

    run_teacher_pass(load_config(a_yaml))  # units[1] and the set again
    # as a killed pass leaves them: shards without a manifest, which the next pass resumes under
    # the unit's lock (a complete unit is reused without it)
    for d in (*units, cache_dir):
        (d / C.MANIFEST).unlink()
    here, go = tmp_path / "gc-paused", tmp_path / "gc-go"
    gc = spawn_stage("stages.cache_info", ["--gc", str(b_yaml), "--yes"], tmp_path / "gc.log",
                     _PAUSE_AT_FIRST_REMOVE.format(here=str(here), go=str(go)))
    try:
        t0 = time.monotonic()
        while not here.exists():
            assert gc.poll() is None, (tmp_path / "gc.log").read_text()
            assert time.monotonic() - t0 < 120, "gc never reached its first removal"
            time.sleep(0.05)
        assert here.read_text() == str(units[0])
        with pytest.raises(C.CacheError, match="lock held"):
            run_teacher_pass(load_config(a_yaml))
        with pytest.raises(BlockingIOError):
            os.close(try_lock(units[0] / ".lock"))
    finally:
        go.touch()
        assert gc.wait(timeout=120) == 0, (tmp_path / "gc.log").read_text()
    assert not units[0].exists() and not units[1].exists()
    assert not [p.name for p in units[0].parent.iterdir() if p.name.startswith(".gc-")]
    cache_dir, status = run_teacher_pass(load_config(a_yaml))
    assert status == "built" and C.TeacherCache(cache_dir).verify() == []
