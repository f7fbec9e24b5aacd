"""Readers' locks and gc (issue 34): a cache in use (a teacher pass reusing units, a training run)
is skipped by `cache_info --gc`, which names the process holding it; a set whose unit is gone is
built again; a symlinked unit is unlinked, never its target; a resume refuses a cache rebuilt with
other bytes; a teacher.cache_root that is a file is named as such. The slow versions, with real
subprocesses, are in test_faults_stage1.py and test_faults_stage2.py."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from conftest import cache_units, tiny_config
from faults_kit import shard_data, train_section, vouch_for, write_yaml
from mol import cache as C
from mol.cache.inspect import garbage_collect
from mol.config import load_config
from mol.teacher import run_teacher_pass
from mol.train import train


def other_k(d: dict, path: Path) -> Path:
    """A config on the same cache root whose units and set are all others (another k): gc with it
    alone removes every folder of `d`'s that is not in use."""
    return write_yaml(path, {**d, "teacher": {**d["teacher"], "top_k": 4}, "train": {}})


def reversed_sources(d: dict) -> dict:
    """The same units in another order: a set of its own that reuses every unit of `d`'s."""
    return {**d, "data": {**d["data"], "sources": d["data"]["sources"][::-1]}}


def copied_small(small, tmp_path: Path, **train) -> dict:
    """The fault suite's small cache, copied to a cache root of this test's own (gc may remove it)."""
    root = tmp_path / "caches"
    shutil.copytree(small["ref_dir"].parent.parent, root)
    d = {**small["cfg"], "teacher": {**small["cfg"]["teacher"], "cache_root": str(root)}}
    if train:
        d["train"] = train_section(tmp_path / "runs", **train)
    return d


def test_a_reusing_teacher_pass_keeps_its_units_from_a_gc(tiny_model_dir, corpora, tmp_path, monkeypatch):
    """A pass that reuses every unit holds them until its set manifest is written: a gc run just
    before that manifest skips them, naming this process. Before: the pass took no lock, gc removed
    the units and the pass failed on them (or, a moment later, wrote a set naming them)."""
    import mol.teacher as T

    a = tiny_config(tiny_model_dir, corpora, tmp_path / "caches")
    a_dir, _ = run_teacher_pass(load_config(data=a))
    units = cache_units(a_dir)
    b_yaml = other_k(a, tmp_path / "b.yaml")
    said, real = [], T._write_set

    def gc_then_write(*args, **kw):
        garbage_collect([str(b_yaml)], yes=True, say=said.append)
        return real(*args, **kw)

    monkeypatch.setattr(T, "_write_set", gc_then_write)
    r_dir, status = run_teacher_pass(load_config(data=reversed_sources(a)))
    assert status == "reused" and r_dir != a_dir
    for u in units:
        assert any(line.startswith(f"skip   {u} (") and f"pid {os.getpid()}" in line for line in said), said
    assert not a_dir.exists(), said  # a's set is in no one's use: removed
    assert C.TeacherCache(r_dir).verify() == []


def test_a_set_whose_unit_is_gone_is_built_again(built):
    """The next pass rebuilds a unit its set manifest names but that is gone (removed by hand or by
    an old gc). Before: "complete: nothing to do", and Stage 2 said run make teacher-cache for ever."""
    cfg, cache_dir = built
    gone = cache_units(cache_dir)[1]
    shutil.rmtree(gone)
    again, status = run_teacher_pass(cfg)
    assert again == cache_dir and status == "built"
    assert (gone / C.MANIFEST).is_file() and C.TeacherCache(cache_dir).verify() == []
    assert run_teacher_pass(cfg)[1] == "up-to-date"


def test_gc_skips_the_cache_of_a_running_trainer(small, tmp_path, monkeypatch):
    """A gc in the middle of a run (with another config) skips the run's set and units, naming this
    process; the run finishes. Before: the trainer held no lock and gc removed its cache."""
    from mol.train import _Loop

    d = copied_small(small, tmp_path, run_name="x")
    b_yaml = other_k(d, tmp_path / "b.yaml")
    cache_dir = C.resolve_cache_key(load_config(data=d)).cache_dir
    folders = [cache_dir, *cache_units(cache_dir)]
    said, real = [], _Loop.step

    def step(self, s, steps):
        if s == 2:
            garbage_collect([str(b_yaml)], yes=True, say=said.append)
        return real(self, s, steps)

    monkeypatch.setattr(_Loop, "step", step)
    run_dir = train(load_config(data=d))
    assert (run_dir / "summary.json").is_file()
    for f in folders:
        assert f.is_dir(), said
        assert any(line.startswith(f"skip   {f} (in use") and f"pid {os.getpid()}" in line for line in said), said
    assert C.TeacherCache(cache_dir).verify() == []


def test_gc_unlinks_a_symlinked_unit_and_keeps_its_target(built, tiny_model_dir, corpora, tmp_path, capsys):
    """A unit folder that is a symlink (e.g. to a shared store) is removed by unlinking the link,
    never its target; a `.gc-*` link an interrupted gc left is cleaned up too. Before: exit 1 with
    `OSError: Cannot call rmtree on a symbolic link`, and the `.gc-*` link broke every later gc."""
    from stages.cache_info import main as cache_info_main

    _, cache_dir = built
    units = cache_units(cache_dir)
    store = tmp_path / "store"
    store.mkdir()
    targets = [store / u.name for u in units]
    shutil.move(units[0], targets[0])
    units[0].symlink_to(targets[0], target_is_directory=True)
    shutil.move(units[1], targets[1])
    leftover = units[1].with_name(f".gc-{units[1].name}-999")  # as an interrupted gc renamed it
    leftover.symlink_to(targets[1], target_is_directory=True)
    b_yaml = other_k(tiny_config(tiny_model_dir, corpora, tmp_path / "caches"), tmp_path / "b.yaml")  # built's root
    assert cache_info_main(["--gc", str(b_yaml), "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"remove {units[0]}" in out and "the link only, its target is kept" in out, out
    assert not os.path.lexists(units[0]) and not os.path.lexists(leftover)
    for t in targets:
        assert C.CacheUnit(t).verify() == []
    assert cache_info_main(["--gc", str(b_yaml), "--yes"]) == 0


def test_stage2_names_a_cache_root_that_is_a_file(small, tmp_path, capsys):
    """teacher.cache_root is a file: one `error:` line naming it, exit 2, before anything is loaded.
    Before: "no complete teacher cache ... run make teacher-cache"."""
    from stages.train import main as train_main

    root = tmp_path / "not-a-folder"
    root.write_text("")
    d = {**small["cfg"], "teacher": {**small["cfg"]["teacher"], "cache_root": str(root)},
         "train": train_section(tmp_path / "runs", run_name="x")}
    assert train_main([str(write_yaml(tmp_path / "t.yaml", d))]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "teacher.cache_root" in err[0] and "is a file, not a folder" in err[0], err
    assert not (tmp_path / "runs" / "x").exists()


def test_a_resume_on_a_cache_rebuilt_with_other_bytes_is_refused(small, tmp_path, capsys):
    """The run records its units' shard digests; a cache rebuilt under the same key whose shards'
    bytes differ (here: the same rows at another zstd level, its manifest vouching for them) is
    refused with one `error:` line naming the unit. Before: accepted on the key alone."""
    from stages.train import main as train_main

    d = copied_small(small, tmp_path, run_name="x")
    yaml = write_yaml(tmp_path / "t.yaml", d)
    run_dir = train(load_config(yaml), stop_after=2)
    record = json.loads((run_dir / "run.json").read_text())
    cache_dir = C.resolve_cache_key(load_config(yaml)).cache_dir
    shard = C.TeacherCache(cache_dir).units[0].shard_paths[0]
    before = C.sha256_path(shard)
    data, k, vocab = shard_data(shard)
    C.write_shard(shard, C.shard_table(data, k, vocab), 1, row_group_rows=pq.ParquetFile(shard).metadata.row_group(0).num_rows)
    vouch_for(shard)
    assert C.sha256_path(shard) != before and C.TeacherCache(cache_dir).verify() == []
    assert train_main([str(yaml), "train.resume=true"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"units/{shard.parent.name}: its shards' sha256 differ" in err[0], err
    assert "rebuilt since the run started" in err[0]
    assert json.loads((run_dir / "run.json").read_text()) == record


def test_a_run_that_recorded_no_shard_digests_resumes_with_a_warning(small, tmp_path, caplog):
    """A run started before run.json held `cache_content` still resumes on its key alone, and says
    that its cache's bytes could not be compared."""
    import logging

    d = copied_small(small, tmp_path, run_name="old")
    yaml = write_yaml(tmp_path / "t.yaml", d)
    run_dir = train(load_config(yaml), stop_after=2)
    record = json.loads((run_dir / "run.json").read_text())
    assert set(record.pop("cache_content")) == {f"units/{u.path.name}" for u in
                                                C.TeacherCache(C.resolve_cache_key(load_config(yaml)).cache_dir).units}
    (run_dir / "run.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="mol.run_folder"):
        train(load_config(yaml, ["train.resume=true"]))
    assert (run_dir / "summary.json").is_file()
    assert "records no shard digests of its cache (started by an older version)" in caplog.text
