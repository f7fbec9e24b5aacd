"""Fault injection, Stage 2 (the trainer): SIGKILL at any point, non-finite numerics, and nothing
wrong accepted. The shared helpers and the explanation of the kills are in faults_kit.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import metrics_records
from faults_kit import (assert_same_metrics, faults, kill_when, latest_state, run_stage, spawn_stage, train_cfg_file,
                        train_section, write_yaml)
from mol import cache as C
from mol.batching import collate
from mol.config import load_config
from mol.losses import chunked_mol_loss
from mol.train import TrainingError, train


# Preambles: each wraps one call so the child SIGKILLs itself at an exact point.

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


# --------------------------------------------------------------------------- 1. SIGKILL


@pytest.fixture(scope="module")
def ref_run(small):
    """An uninterrupted 6-step run, checkpointing every step, on the small cache."""
    d = {**small["cfg"], "train": train_section(small["root"] / "runs", run_name="ref")}
    return train(load_config(data=d))


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
    name, state = latest_state(run_dir)
    assert name == f"step-{state['step']:06d}"
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())
    return name


def test_train_sigkill_resumes_identically(small, ref_run, tmp_path):
    cfg_path, run_dir = train_cfg_file(small, tmp_path)
    proc = spawn_stage("stages.train", [cfg_path, "train.run_name=x"], tmp_path / "kill.log")
    killed, loaded = _watch_checkpoints(proc, run_dir, "step-000002")
    assert killed, (tmp_path / "kill.log").read_text()[-3000:]
    assert _after_kill_checks(run_dir) >= "step-000002"
    assert not (run_dir / "summary.json").exists()
    train(load_config(cfg_path, ["train.run_name=x", "train.resume=true"]))
    assert_same_metrics(metrics_records(ref_run), metrics_records(run_dir))


# kill points: after the k-th checkpoint appears (0: before any checkpoint, once metrics exist;
# 6: after the last one, while the final validation and outputs are written), or self-inflicted
STAGE2_KILLS = ["ckpt-0", "ckpt-1", "ckpt-3", "ckpt-5", "ckpt-6", "in-checkpoint-3", "torn-metrics-4", "in-outputs-6"]


@faults
@pytest.mark.parametrize("kill", STAGE2_KILLS)
def test_train_sigkill_sweep(small, ref_run, tmp_path, kill):
    cfg_path, run_dir = train_cfg_file(small, tmp_path)
    args = [cfg_path, "train.run_name=x"]
    log = tmp_path / "kill.log"
    if kill.startswith("ckpt-"):
        k = int(kill.split("-")[1])
        proc = spawn_stage("stages.train", args, log)
        if k == 0:
            killed = kill_when(proc, lambda: (run_dir / "metrics.jsonl").is_file(), every=0.001)
        else:
            killed, _ = _watch_checkpoints(proc, run_dir, f"step-{k:06d}")
        assert killed, log.read_text()[-3000:]
    else:
        step = int(kill.rsplit("-", 1)[1])
        pre = {"in-checkpoint": _pre_kill_in_checkpoint, "torn-metrics": _pre_torn_metrics_line,
               "in-outputs": _pre_kill_in_outputs}[kill.rsplit("-", 1)[0]](step)
        rc, out = run_stage("stages.train", args, log, pre)
        assert rc == -signal.SIGKILL, out[-3000:]
    _after_kill_checks(run_dir)
    rc, out = run_stage("stages.train", args + ["train.resume=true"], tmp_path / "resume.log")
    assert rc == 0, out[-3000:]
    assert_same_metrics(metrics_records(ref_run), metrics_records(run_dir))
    assert not list((run_dir / "checkpoints").glob(".tmp*")), "a killed checkpoint's temp folder was left behind"


# --------------------------------------------------------------------------- 2. numerics


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
    d = {**small["cfg"], "train": train_section(tmp_path / "runs", run_name="nan")}
    with pytest.raises(TrainingError, match="non-finite") as e:
        train(load_config(data=d))
    assert "step 3" in str(e.value)
    run_dir = tmp_path / "runs" / "nan"
    name, state = latest_state(run_dir)
    assert name == "step-000002" and state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())
    assert not (run_dir / "checkpoints" / "step-000003").exists()
    assert [r["step"] for r in metrics_records(run_dir) if r["type"] == "train"] == [1, 2]


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
    # decoded as the reader decodes, without its contract checks: the loss must stay finite even on
    # rows the checks refuse (raw zero codes, no mass anywhere), a second line of defence
    import pyarrow.parquet as pq

    seqs = C.sequences_from_tables([pq.read_table(tmp_path / C.shard_name(0, p)) for p in (0, 1)], tmp_path, k)
    assert len(seqs) == n
    assert C.sequences_problem(seqs, vocab_size=vocab) is not None  # the checks refuse the last row whichever way
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


# --------------------------------------------------------------------------- 3. nothing wrong accepted
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
    cfg_path, run_dir = train_cfg_file(small, tmp_path)
    args = [cfg_path, "train.run_name=x"]
    pre = _pre_overflow_at(3) if case == "non-finite-weights" else _pre_disk_full_in_checkpoint(3)
    rc, out = run_stage("stages.train", args, tmp_path / "a.log", pre)
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    assert ("non-finite weights" if case == "non-finite-weights" else "No space left on device") in out, out[-3000:]
    name, state = latest_state(run_dir)
    assert name == "step-000002" and all(torch.isfinite(v).all() for v in state["trainable"].values())
    assert str(run_dir / "checkpoints" / name) in out
    assert not list((run_dir / "checkpoints").glob(".tmp*")) and not (run_dir / "adapter").exists()
    rc, out = run_stage("stages.train", args + ["train.resume=true"], tmp_path / "resume.log")
    assert rc == 0, out[-3000:]
    assert_same_metrics(metrics_records(ref_run), metrics_records(run_dir))


@faults
def test_two_trainers_on_one_run_folder_cli(small, tmp_path):
    """Started together on one run name: exactly one trains, the other exits 2 naming the lock;
    every metrics line is written once."""
    cfg_path, run_dir = train_cfg_file(small, tmp_path)
    procs = [spawn_stage("stages.train", [cfg_path, "train.run_name=x"], tmp_path / f"{i}.log") for i in range(2)]
    rcs = sorted(p.wait(timeout=300) for p in procs)
    logs = "\n".join((tmp_path / f"{i}.log").read_text() for i in range(2))
    assert rcs == [0, 2], logs[-3000:]
    assert "another trainer is writing this run folder" in logs or "already holds a run" in logs, logs[-3000:]
    assert "Traceback" not in logs
    steps = [(r["type"], r["step"]) for r in metrics_records(run_dir)]
    assert len(steps) == len(set(steps)) and ("train", 6) in steps


# Each rank of an `accelerate launch` runs this instead of `-m stages.train`: its stderr to a file
# of its own and its exit status recorded before it exits (the launcher stops the other ranks as
# soon as one fails, and reports one status for all).
_RANK_RECORDER = """
import os, sys
out, rank = sys.argv[1], os.environ["RANK"]
sys.stderr = open(os.path.join(out, f"rank{rank}.err"), "w", buffering=1)
from stages.train import main
rc = main(sys.argv[2:])
with open(os.path.join(out, f"rank{rank}.rc"), "w") as f:
    f.write(str(rc))
sys.exit(rc)
"""


@faults
def test_a_multi_process_launch_on_a_locked_run_folder_is_refused_on_every_rank_cli(small, tmp_path):
    """A 2-process launch (accelerate, gloo DDP on CPU) resuming a run folder whose lock another
    trainer holds: every rank exits 2 naming the lock, and the folder is byte-identical after.
    Before: only rank 0 took the lock and stopped; rank 1 went on to the barrier and died there
    with a gloo "Connection closed by peer" traceback (then SIGTERM from the launcher)."""
    import fcntl
    import sys

    cfg_path, run_dir = train_cfg_file(small, tmp_path)
    train(load_config(cfg_path, ["train.run_name=x"]), stop_after=2)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    script, out = tmp_path / "rank.py", tmp_path / "ranks"
    script.write_text(_RANK_RECORDER)
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd()] + sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(script), str(out), str(cfg_path), "train.run_name=x", "train.resume=true"]
    fd = os.open(run_dir / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the first trainer, still running
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.close(fd)
    log = r.stderr[-3000:] + "".join(f"\n--- {p.name}\n" + p.read_text()[-3000:] for p in sorted(out.iterdir()))
    assert r.returncode != 0, log
    for rank in (0, 1):
        assert (out / f"rank{rank}.rc").is_file() and (out / f"rank{rank}.rc").read_text() == "2", log
        err = (out / f"rank{rank}.err").read_text()
        assert "another trainer is writing this run folder (lock held)" in err and "Traceback" not in err, log
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@faults
def test_a_resume_with_changed_settings_is_refused_cli(small, tmp_path):
    cfg_path, run_dir = train_cfg_file(small, tmp_path)
    rc, out = run_stage("stages.train", [cfg_path, "train.run_name=x", "train.max_steps=2"], tmp_path / "a.log")
    assert rc == 0, out[-3000:]
    before = {p: (run_dir / p).read_bytes() for p in ("config.yaml", "metrics.jsonl")}
    rc, out = run_stage("stages.train", [cfg_path, "train.run_name=x", "train.resume=true", "train.max_steps=4",
                                    "train.general_ratio=2", "model.dtype=bfloat16"], tmp_path / "b.log")
    assert rc == 2 and "Traceback" not in out, out[-3000:]
    for line in ("train.max_steps: 2 -> 4", "train.general_ratio: 1.0 -> 2.0", "model.dtype: 'auto' -> 'bfloat16'"):
        assert line in out, out[-3000:]
    assert {p: (run_dir / p).read_bytes() for p in before} == before
    rc, out = run_stage("stages.train", [cfg_path, "train.resume=true"], tmp_path / "c.log")
    assert rc == 2 and "train.resume=true needs train.run_name" in out, out[-3000:]


# --------------------------------------------------------------------------- 4. a gc during a run


def _pre_slow_steps(seconds: float) -> str:
    """Every optimizer step takes `seconds` longer: the run is still training when the gc comes."""
    return f"""
import time
from mol.train import _Loop
_real = _Loop.step
def _slow(self, *a, **kw):
    time.sleep({seconds})
    return _real(self, *a, **kw)
_Loop.step = _slow
"""


@faults
def test_gc_during_a_training_run_skips_its_cache_cli(small, ref_run, tmp_path):
    """`cache_info --gc other.yaml --yes` while a trainer runs on the cache: gc skips the run's set and
    units naming the trainer's pid, and the run finishes identical to the uninterrupted one. Before:
    the trainer held no lock, gc removed its cache and the run stopped (at step 4 in the report)."""
    root = tmp_path / "caches"
    shutil.copytree(small["ref_dir"].parent.parent, root)
    d = {**small["cfg"], "teacher": {**small["cfg"]["teacher"], "cache_root": str(root)},
         "train": train_section(tmp_path / "runs", run_name="x")}
    cfg_path = write_yaml(tmp_path / "train.yaml", d)
    other = write_yaml(tmp_path / "other.yaml", {**d, "teacher": {**d["teacher"], "top_k": 4}, "train": {}})
    cache_dir = C.resolve_cache_key(load_config(cfg_path)).cache_dir
    folders = [cache_dir, *(u.path for u in C.TeacherCache(cache_dir).units)]
    trainer = spawn_stage("stages.train", [cfg_path], tmp_path / "train.log", _pre_slow_steps(1.0))
    metrics = tmp_path / "runs" / "x" / "metrics.jsonl"
    t0 = time.monotonic()
    while not (metrics.is_file() and '"type": "train"' in metrics.read_text()):
        assert trainer.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        assert time.monotonic() - t0 < 120, "the trainer never reached its first step"
        time.sleep(0.05)
    rc, out = run_stage("stages.cache_info", ["--gc", str(other), "--yes"], tmp_path / "gc.log")
    assert trainer.poll() is None, "the run ended before the gc: test too slow"
    assert rc == 0 and "Traceback" not in out, out[-3000:]
    for f in folders:
        assert f"skip   {f} (in use by a trainer" in out and f"pid {trainer.pid})" in out, out[-3000:]
        assert f.is_dir()
    assert trainer.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-3000:]
    assert_same_metrics(metrics_records(ref_run), metrics_records(tmp_path / "runs" / "x"))
