"""The run folder refuses what would make a run's results wrong, through the user's entry point
(`stages.train.main`: exit 2, a message naming the key, file or step; never a traceback):
non-finite weights, a resume with other settings or another checkpoint, a second trainer, a full
disk. Each case leaves the folder as the last good state and a resume from it completes."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from mol.config import load_config
from mol.teacher import run_teacher_pass
from mol.train import train
from stages.train import main as train_main


@pytest.fixture
def setup(tiny_model_dir, corpora, tmp_path) -> dict:
    d = tiny_config(tiny_model_dir, corpora, tmp_path / "caches")
    d["train"] = {"global_batch": 4, "micro_batch": 2, "max_steps": 4, "eval_every": 2, "save_every": 1,
                  "lr": 1e-3, "out_dir": str(tmp_path / "runs"), "run_name": "r",
                  "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    run_teacher_pass(load_config(data=d))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(d))
    return {"cfg": d, "path": str(path), "run": tmp_path / "runs" / "r"}


def _main(setup, *overrides) -> int:
    return train_main([setup["path"], *overrides])


def _latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _state(run: Path) -> dict:
    return torch.load(_latest(run) / "state.pt", weights_only=True)


def _steps(run: Path) -> list[tuple[str, int]]:
    return [(r["type"], r["step"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state["trainable"].values())


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def _overflow_at(monkeypatch, step: int) -> None:
    """The optimizer's update at `step` (1-based) leaves an infinity in one weight: what a learning
    rate or weight decay too large for the dtype does, with a finite loss and finite gradients."""
    real, calls = torch.optim.AdamW.step, {"n": 0}

    def step_(self, *a, **kw):
        out = real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == step:
            with torch.no_grad():
                self.param_groups[0]["params"][-1].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step_)


def test_non_finite_weights_are_never_saved(setup, capsys, monkeypatch):
    """Step 2's update overflows a weight: the run stops at step 2, the last checkpoint is step 1 and
    finite (and named), no adapter is written; a resume from it completes."""
    _overflow_at(monkeypatch, 2)
    assert _main(setup) == 2
    err = _error(capsys)
    assert "non-finite weights" in err and "step 2" in err, err
    run = setup["run"]
    assert _latest(run).name == "step-000001" and _finite(_state(run))
    assert str(_latest(run)) in err
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    monkeypatch.undo()
    assert _main(setup, "train.resume=true") == 0
    assert _steps(run)[-1] == ("val", 4) and _finite(_state(run))


def test_non_finite_weights_at_the_last_step_exit_2(setup, capsys, monkeypatch):
    """The whole run is one step and it overflows: nothing is saved and the exit status says so."""
    _overflow_at(monkeypatch, 1)
    assert _main(setup, "train.max_steps=1", "train.run_name=one") == 2
    assert "non-finite weights" in _error(capsys)
    run = setup["run"].parent / "one"
    assert not (run / "adapter").exists() and not (run / "checkpoints").exists()


def test_a_resume_refuses_changed_settings_and_records_allowed_ones(setup, capsys):
    train(load_config(setup["path"]), stop_after=2)
    run = setup["run"]
    config_before, metrics_before = (run / "config.yaml").read_bytes(), (run / "metrics.jsonl").read_bytes()
    assert _main(setup, "train.resume=true", "train.lr=2e-3", "train.alpha=0.5", "data.max_seq_len=40") == 2
    err = _error(capsys)
    for line in ("train.lr: 0.001 -> 0.002", "train.alpha: 0.01 -> 0.5", "data.max_seq_len: 48 -> 40"):
        assert line in err, err
    assert (run / "config.yaml").read_bytes() == config_before
    assert (run / "metrics.jsonl").read_bytes() == metrics_before
    # what cannot change a weight or a metric's value is allowed, and recorded
    assert _main(setup, "train.resume=true", "train.eval_every=1", "train.save_every=3") == 0
    assert (run / "config.yaml").read_bytes() == config_before
    resumes = json.loads((run / "run.json").read_text())["resumes"]
    assert resumes == [{"step": 2, "at": resumes[0]["at"],
                        "changed": {"train.eval_every": [2, 1], "train.save_every": [1, 3]}}]
    assert ("val", 3) in _steps(run)


def test_a_resume_refuses_another_cache(setup, capsys, tiny_model_dir, corpora, tmp_path):
    """Same settings, but the cache it names now holds other labels (the corpus changed and was
    relabelled): the run started from the old labels and must not continue on the new."""
    train(load_config(setup["path"]), stop_after=2)
    with open(corpora["gen"], "a") as f:
        f.write(json.dumps({"text": "One more paragraph about the harbour and the boats in it."}) + "\n")
    run_teacher_pass(load_config(setup["path"]))
    assert _main(setup, "train.resume=true") == 2
    assert "the run started from teacher cache" in _error(capsys)


def test_a_resume_of_a_run_that_does_not_exist_is_refused(setup, capsys):
    assert _main(setup, "train.resume=true", "train.run_name=typo") == 2
    assert "holds no run to continue" in _error(capsys)
    assert not (setup["run"].parent / "typo").exists()


def test_a_second_trainer_on_one_run_folder_is_refused(setup, capsys):
    """Another process holds the run folder's lock (a trainer running): this one exits 2 and writes
    nothing; after the lock is released it runs."""
    run = setup["run"]
    run.mkdir(parents=True)
    fd = os.open(run / ".lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert _main(setup) == 2
        assert "another trainer is writing this run folder" in _error(capsys)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        os.close(fd)
    assert _main(setup) == 0


def test_a_checkpoint_that_does_not_fit_is_refused(setup, capsys):
    train(load_config(setup["path"]), stop_after=2)
    run = setup["run"]
    path = _latest(run) / "state.pt"
    good = _state(run)
    name = next(iter(good["trainable"]))
    for bad, needle in (
        ({**good, "trainable": {**good["trainable"], name: good["trainable"][name] * float("nan")}}, "non-finite weights"),
        ({**good, "trainable": {**good["trainable"], name: good["trainable"][name][:1]}}, "shape"),
        ({k: v for k, v in good.items() if k != "optimizer"}, "'optimizer' missing"),
    ):
        torch.save(bad, path)
        assert _main(setup, "train.resume=true") == 2
        assert needle in _error(capsys)
    torch.save(good, path)
    assert _main(setup, "train.resume=true") == 0


@pytest.mark.parametrize("where", ["checkpoint", "adapter", "adapter-safetensors"])
def test_a_full_disk_while_saving_is_explained_and_cleaned_up(setup, capsys, monkeypatch, where):
    """ENOSPC in checkpoint 2's write, or in the final adapter's (an OSError, or safetensors' own
    error, which is not one): exit 2 naming the path, the partial write removed, nothing earlier
    lost; a resume after space is freed finishes the run."""
    if where == "checkpoint":
        real = torch.save

        def full(obj, f, *a, **kw):
            if isinstance(obj, dict) and obj.get("step") == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(obj, f, *a, **kw)

        monkeypatch.setattr(torch, "save", full)
    elif where == "adapter":
        from peft import PeftModel

        def full(self, path, *a, **kw):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "adapter_model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(PeftModel, "save_pretrained", full)
    elif where == "adapter-safetensors":
        import peft.peft_model
        from safetensors import SafetensorError

        def full(tensors, filename, *a, **kw):
            Path(filename).write_bytes(b"partial")
            # safetensors' text for ENOSPC (its save_file under a file size limit says "File too large")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(peft.peft_model, "safe_save_file", full)
    assert _main(setup) == 2
    err = _error(capsys)
    run = setup["run"]
    assert "No space left on device" in err and "train.resume=true" in err, err
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / "adapter").exists()
    assert not list(run.glob(".tmp-*")), list(run.iterdir())
    assert _latest(run).name == ("step-000001" if where == "checkpoint" else "step-000004")
    assert str(_latest(run)) in err
    monkeypatch.undo()
    assert _main(setup, "train.resume=true") == 0
    assert (run / "adapter" / "adapter_config.json").is_file()
    steps = _steps(run)
    assert steps == [("val", 0), ("train", 1), ("train", 2), ("val", 2), ("train", 3), ("train", 4), ("val", 4)]
