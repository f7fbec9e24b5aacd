"""The one runner of stage child processes (mol/stage_process.py): environment, log, failure."""

from __future__ import annotations

import sys

import pytest

from mol.errors import StageFailed
from mol.stage_process import ROOT, run_stage, stage_env, threads_per_process


def test_env_sets_threads_per_process_and_finds_mol():
    env = stage_env(threads_per_process(2))
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(max(1, (__import__("os").cpu_count() or 1) // 2))
    assert env["PYTHONPATH"].split(":")[0] == str(ROOT)
    assert env["TQDM_DISABLE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert threads_per_process(10_000) == 1


def test_child_output_logged_and_measured(tmp_path):
    log = tmp_path / "logs" / "ok.log"
    done = run_stage("mol.errors", [], log)  # a module that imports and exits 0
    assert log.is_file() and done.seconds > 0 and done.peak_rss_mb > 0 and done.reached_s is None
    done = run_stage("mol.errors", [], log, reached=lambda: True)
    assert done.reached_s is None or done.reached_s >= 0


def test_failure_names_command_and_log_tail(tmp_path):
    log = tmp_path / "bad.log"
    with pytest.raises(StageFailed) as e:
        run_stage("json.tool", [tmp_path / "missing.json"], log)
    msg = str(e.value)
    assert msg.startswith(f"{sys.executable} -m json.tool {tmp_path / 'missing.json'} exited ")
    assert str(log) in msg and "missing.json" in msg.splitlines()[-1]


def test_the_peak_is_the_childs_own_not_its_runners(tmp_path, monkeypatch):
    """A 1 GB runner and a child that imports one small module: the child's own peak is reported
    (ru_maxrss would carry the runner's 1 GB into it), and a child that does hold memory shows it."""
    ballast = bytearray(1 << 30)
    ballast[::4096] = b"x" * len(ballast[::4096])  # resident, not only reserved
    small = run_stage("mol.errors", [], tmp_path / "small.log")
    assert small.peak_rss_mb < 500, small
    big = tmp_path / "big.py"
    big.write_text("b = bytearray(700 << 20)\nb[::4096] = b'x' * len(b[::4096])\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the child finds big.py
    held = run_stage("big", [], tmp_path / "big.log")
    assert 700 < held.peak_rss_mb < 1200, held
    assert not list(tmp_path.glob("*.peak-rss"))
    del ballast
