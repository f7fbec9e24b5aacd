"""The run folder: one owner for its file names, its lock, its checkpoints, its metrics and what a
resumed run may change.

    <out_dir>/<run_name>/
      config.yaml     the config the run started with (never rewritten by a resume)
      run.json        what it trained from (the cache's fingerprint and its units' shard
                      digests) and every resume, with the settings that resume changed
      metrics.jsonl   one line per optimizer step and per validation
      checkpoints/    step-NNNNNN/state.pt and `latest`, which only ever names a complete one
      adapter/ | model/ [merged/]   the weights, written at the end
      summary.json    written last: the run finished
      tb/             TensorBoard's event files (its own writer, in the folder this module names)
      eval.json, eval.md, eval-samples/<model>/<task>.jsonl    `make eval`'s results
      plots/*.png     `make plots`
      peak_rss.json   `make qlora`: the training process's peak memory
      .lock           held by the one trainer writing the folder

Every file is named here and written through this module (`RunFolder.write_file`: atomic, a reader
sees the old file or the whole new one); train, eval, plots, experiment, qlora and scale read it
through it (`read_metrics`, `read_summary`, `read_config`).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import ConfigError, MolConfig, config_to_dict, config_yaml, expand_path, load_config
from .errors import MolError
from .files import fsync_dir, fsync_tree, replace_durably, try_lock, write_atomic

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
RECORD = "run.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
ADAPTER, MODEL, MERGED = "adapter", "model", "merged"
TENSORBOARD = "tb"
LOCK = ".lock"
# written by `make eval` (mol/evaluate.py): the results, the table, lm-eval's per-sample logs
EVAL_JSON, EVAL_MD, EVAL_SAMPLES = "eval.json", "eval.md", "eval-samples"
PLOTS_DIR = "plots"               # written by `make plots` (mol/plots.py)
PEAK_RSS = "peak_rss.json"        # written by `make qlora` (mol/qlora.py)
# what the command line lists when a run ends
OUTPUTS = (ADAPTER, MODEL, MERGED, METRICS, SUMMARY, CONFIG, RECORD, TENSORBOARD)

# Settings a resumed run may change: they decide what is logged or kept and where files are found,
# never a weight or the value of a metric. teacher.* acts on a run only through its cache, whose
# fingerprint the resume compares itself (run.json). Everything else must be what the run started with.
RESUME_MAY_CHANGE = frozenset({
    "train.eval_every", "train.save_every", "train.grad_probe_sequences", "train.reader_cache_mb",
    "train.resume", "train.merge", "train.out_dir", "train.cache_dir",
    # what `make eval` runs afterwards: no weight or training metric depends on it
    "eval.mcq_items", "eval.mcq_sets", "eval.tasks", "eval.chat_template", "eval.gen_kwargs",
})


class RunFolderError(MolError, RuntimeError):
    """A run folder cannot be started, resumed or written (in use, changed config, full disk...)."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "chat_template_kwargs" and k != "vllm_kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _reason(e: Exception) -> str:
    """The system's words for a failed write; safetensors wraps them in its own text
    ('Error while serializing: I/O error: No space left on device (os error 28)')."""
    if getattr(e, "strerror", None):
        return e.strerror
    text = str(e)
    found = re.search(r"I/O error: (.+?) \(os error \d+\)", text)
    return found.group(1) if found else (text.splitlines() or [type(e).__name__])[0]


def _may_change(key: str) -> bool:
    return key in RESUME_MAY_CHANGE or key.startswith("teacher.")


def content_changes(before: dict, now: dict) -> list[str]:
    """How a cache's shard digests (`TeacherCache.content_digests`) differ from those a run recorded:
    one line a unit."""
    out = []
    for unit in sorted(before.keys() | now.keys()):
        if unit not in now:
            out.append(f"{unit} was in the run's cache, not in this one")
        elif unit not in before:
            out.append(f"{unit} is not in the run's cache")
        elif before[unit] != now[unit]:
            out.append(f"{unit}: its shards' sha256 differ (digest {str(before[unit])[:12]} when the run "
                       f"started, {now[unit][:12]} now)")
    return out


def default_run_name(cfg: MolConfig) -> str:
    t = cfg.train
    return f"{t.mode}-a{t.alpha:g}-r{t.general_ratio:g}-{time.strftime('%Y%m%d-%H%M%S')}"


def non_finite(named_tensors) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return [n for n, t in named_tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def for_config(cls, cfg: MolConfig) -> "RunFolder":
        out = expand_path(cfg.train.out_dir)
        path = out / (cfg.train.run_name or default_run_name(cfg))
        # the config allows one plain name; this holds even for names a filesystem resolves oddly
        if path.resolve().parent != out.resolve():
            raise RunFolderError(f"train.run_name {cfg.train.run_name!r} would write outside {out}")
        return cls(path)

    # ------------------------------------------------------------------ names

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    def holds_run(self) -> bool:
        return any((self.path / n).exists() for n in (CONFIG, METRICS, CHECKPOINTS))

    def finished(self) -> bool:
        return (self.path / SUMMARY).is_file()

    def weights_dir(self, finetune: str) -> Path:
        return self.path / (ADAPTER if finetune == "lora" else MODEL)

    # ------------------------------------------------------------------ lock

    @contextmanager
    def lock(self, main: bool = True, share=None):
        """One trainer per folder: a second one is refused while the first holds the lock. A folder
        this call created is removed again if the run leaves nothing in it (e.g. the cache failed).

        Under several processes only the main one (`main`) takes the lock, and `share(x)` gives
        every process the main one's x: a refusal stops every rank here, before any of them reads
        or writes the folder (otherwise the others would run on without the lock, or wait forever
        for a rank 0 that has exited)."""
        created, fd, refused = [], None, None
        if main:
            created = [p for p in (self.path, *self.path.parents) if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            try:
                fd = try_lock(self.path / LOCK)
            except BlockingIOError:
                refused = (f"{self.path}: another trainer is writing this run folder (lock held); "
                           f"wait for it or choose another train.run_name")
        if share is not None:
            refused = share(refused)
        if refused:
            raise RunFolderError(refused)
        try:
            yield self
        finally:
            if fd is not None:
                os.close(fd)
            if created and {p.name for p in self.path.iterdir()} <= {LOCK}:
                shutil.rmtree(self.path, ignore_errors=True)
                for parent in created[1:]:  # e.g. a new out_dir: gone again unless another run is in it
                    try:
                        parent.rmdir()
                    except OSError:
                        break

    # ------------------------------------------------------------------ start and resume

    def check_fresh(self) -> None:
        if self.holds_run():
            raise RunFolderError(f"{self.path} already holds a run; set train.resume=true to continue it "
                                 f"or choose another train.run_name")

    def check_resume(self, cfg: MolConfig) -> dict:
        """Compare the config with the one the run started with. Returns the allowed changes
        {key: [old, new]}; raises listing every change a resume may not make."""
        if not (self.path / CONFIG).is_file():
            others = sorted(p.name for p in self.path.parent.glob("*") if (p / CONFIG).is_file())
            raise RunFolderError(f"train.resume=true: {self.path} holds no run to continue (no {CONFIG}); "
                                 f"runs in {self.path.parent}: {', '.join(others) or 'none'}")
        try:
            old = load_config(self.path / CONFIG)
        except ConfigError as e:
            raise RunFolderError(f"{self.path / CONFIG}: the run's own config no longer loads, so a resume "
                                 f"cannot tell what changed:\n  - " + "\n  - ".join(e.problems)) from None
        a, b = _flat(config_to_dict(old)), _flat(config_to_dict(cfg))
        changed = {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
        refused = {k: v for k, v in changed.items() if not _may_change(k)}
        if refused:
            lines = [f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in refused.items()]
            raise RunFolderError(
                f"{self.path}: a resumed run must use the settings it started with ({self.path / CONFIG}); "
                f"these would change its results:\n  - " + "\n  - ".join(lines)
                + "\nput them back, or start a new run (another train.run_name)")
        return {k: v for k, v in changed.items() if k != "train.resume"}

    def _record(self) -> dict:
        p = self.path / RECORD
        if not p.is_file():
            return {}
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise RunFolderError(f"{p}: unreadable ({e})") from None
        if not isinstance(rec, dict):
            raise RunFolderError(f"{p}: not a JSON object")
        return rec

    def start(self, cfg: MolConfig, cache_fingerprint: str, cache_dir: Path, cache_content: dict | None = None) -> None:
        """config.yaml and run.json: the cache's fingerprint (its key) and `cache_content`, its units'
        shard digests (`TeacherCache.content_digests`), which a resume compares."""
        self._write(self.path / CONFIG, config_yaml(cfg).encode())
        self._write_record({"cache_fingerprint": cache_fingerprint, "cache_dir": str(cache_dir),
                            **({"cache_content": cache_content} if cache_content is not None else {}),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumes": []})

    def check_cache(self, cache_fingerprint: str, cache_content: dict | None = None) -> None:
        """A resumed run must train on the labels it started with: the same key (fingerprint) and,
        where run.json recorded them, the same bytes (a cache rebuilt under the same key, e.g. by a
        GPU teacher after a gc, may hold other labels)."""
        rec = self._record()
        before = rec.get("cache_fingerprint")
        if before is None:
            log.warning("%s has no %s (started by an older version): its cache cannot be compared", self.path, RECORD)
        elif before != cache_fingerprint:
            raise RunFolderError(
                f"{self.path}: the run started from teacher cache {before[:16]}, this config names "
                f"{cache_fingerprint[:16]} (other data, model or teacher settings); a resumed run must "
                f"train on the labels it started with")
        if cache_content is None or before is None:
            return
        if not isinstance(rec.get("cache_content"), dict):
            log.warning("%s records no shard digests of its cache (started by an older version): the "
                        "cache's key matches, its bytes cannot be compared", self.path / RECORD)
            return
        changed = content_changes(rec["cache_content"], cache_content)
        if changed:
            raise RunFolderError(
                f"{self.path}: teacher cache {cache_fingerprint[:16]} was rebuilt since the run started, with "
                f"other bytes: {'; '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}; a resumed run "
                f"must train on the labels it started with: restore that cache, or start a new run "
                f"(another train.run_name)")

    def record_resume(self, step: int, changes: dict) -> None:
        """Appended to run.json: the step resumed from and the settings changed (none that matter)."""
        rec = self._record()
        rec.setdefault("resumes", []).append({"step": step, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                              "changed": changes})
        if changes:
            log.info("resumed with changed settings that cannot change results: %s",
                     ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items()))
        self._write_record(rec)

    def _write_record(self, rec: dict) -> None:
        self._write(self.path / RECORD, (json.dumps(rec, indent=2) + "\n").encode())

    # ------------------------------------------------------------------ writes

    def _write(self, path: Path, data: bytes) -> None:
        try:
            write_atomic(path, data)
        except OSError as e:
            raise RunFolderError(self._write_failed(path, e)) from None

    def _write_failed(self, path: Path, e: Exception, removed: Path | None = None) -> str:
        latest = self.latest_checkpoint()
        kept = (f"the last checkpoint, {latest}, is intact" if latest
                else "no checkpoint was written yet")
        return (f"could not write {path} ({_reason(e)}); "
                f"the run stopped. Nothing written before was lost: {kept}"
                + (f"; the partial {removed} was removed" if removed else "")
                + f". Free space and continue with train.resume=true train.run_name={self.path.name}")

    def write_file(self, name: str | Path, data: bytes) -> Path:
        """Write `name` (relative to the folder; its parent folders are made) atomically; returns its
        path. Errors are the system's own (OSError), for a caller that is not the trainer."""
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        return path

    def append_metric(self, rec: dict) -> None:
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:
            raise RunFolderError(self._write_failed(self.metrics_path, e)) from None

    def metrics(self) -> list[dict]:
        """Every record (JSON object) of metrics.jsonl in file order, [] when there is none yet. A
        malformed line (one a running trainer is still writing, or one torn by a kill) is skipped
        with a warning."""
        out, bad = [], 0
        if self.metrics_path.is_file():
            for ln in self.metrics_path.read_text().splitlines():
                if not ln.strip():
                    continue
                try:
                    rec = json.loads(ln)
                except ValueError:
                    rec = None
                if isinstance(rec, dict):
                    out.append(rec)
                else:
                    bad += 1
        if bad:
            log.warning("%s: skipped %d malformed lines", self.metrics_path, bad)
        return out

    def truncate_metrics(self, step: int, final_step: int) -> None:
        """On resume from the checkpoint at `step` (0: none), drop every line the restarted run writes
        again: all lines after the checkpoint, the step-0 validation when there is no checkpoint, and
        the final validation when the checkpoint is the last step (it runs after that checkpoint)."""
        if not self.metrics_path.is_file():
            return
        keep = []
        for rec in self.metrics():
            s = rec.get("step", -1)
            if s < step or (s == step and step > 0 and not (rec.get("type") == "val" and step == final_step)):
                keep.append(json.dumps(rec))
        self._write(self.metrics_path, ("\n".join(keep) + "\n" if keep else "").encode())

    def write_summary(self, summary: dict) -> None:
        self._write(self.path / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())

    def save_weights(self, model, tokenizer, finetune: str, merged: bool, merge=None) -> None:
        """The adapter (or the full model), and the merged model when asked (`merge(adapter_dir)`
        builds it when the trained model's own merge would not do, e.g. on a quantized base). Each
        folder is written as a checkpoint is (temp folder, fsync, rename), so it only ever exists
        complete; a full disk is reported with what survived (the final checkpoint), and the partial
        folder removed."""
        for stale in self.path.glob(".tmp-*"):  # a killed save's (any pid); one trainer per run folder
            shutil.rmtree(stale, ignore_errors=True)
        target = self.weights_dir(finetune)
        if finetune == "lora":
            self._save_folder(target, model.save_pretrained)
            if merged:
                full = merge(target) if merge is not None else model.merge_and_unload()
                self._save_folder(self.path / MERGED, full.save_pretrained, tokenizer.save_pretrained)
        else:
            self._save_folder(target, model.save_pretrained, tokenizer.save_pretrained)

    def _save_folder(self, target: Path, *writers) -> None:
        """`writer(folder)` each into a temp folder, then fsync it and rename it to `target`."""
        from safetensors import SafetensorError

        tmp = self.path / f".tmp-{target.name}-{os.getpid()}"
        try:
            for write in writers:
                write(tmp)
            fsync_tree(tmp)
            shutil.rmtree(target, ignore_errors=True)
            replace_durably(tmp, target)
        # safetensors reports a full disk as its own error, not as an OSError
        except (OSError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RunFolderError(self._write_failed(target, e, removed=tmp)) from None

    # ------------------------------------------------------------------ checkpoints

    def latest_checkpoint(self) -> Path | None:
        latest = self.checkpoints / "latest"
        return self.checkpoints / latest.read_text().strip() if latest.is_file() else None

    def save_checkpoint(self, step: int, model, opt, keep: int = 2) -> Path:
        """Write to a temp folder, then rename: `latest` only ever points at a complete checkpoint.
        Weights are checked finite first, so no checkpoint ever holds a NaN."""
        trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
        bad = non_finite(trainable.items())
        if bad:
            raise RunFolderError(f"step {step}: non-finite weights in {', '.join(bad[:3])}"
                                 f"{' ...' if len(bad) > 3 else ''}; not saved")
        root = self.checkpoints
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{step:06d}"
        tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
        # temp folders of a killed save (any pid) are never a checkpoint; one trainer per run folder
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.mkdir()
            with open(tmp / "state.pt", "wb") as f:
                torch.save({"step": step, "trainable": trainable, "optimizer": opt.state_dict(),
                            "torch_rng": torch.get_rng_state()}, f)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            replace_durably(tmp, final)
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            raise RunFolderError(self._write_failed(final, e, removed=tmp)) from None
        self._write(root / "latest", final.name.encode())
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, model, opt) -> int:
        """Restore the trainable weights, the optimizer and the RNG; returns the step. Everything is
        checked before anything is applied: tensors only (never unpickled objects), the parameter
        names and shapes of this model, finite values."""
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            raise RunFolderError(f"{self.path} has no checkpoint")
        path = ckpt / "state.pt"
        if not path.is_file():
            raise RunFolderError(f"{self.checkpoints / 'latest'} names {ckpt.name}, which has no state.pt")
        try:
            # tensors and plain containers only: unpickling anything else could run code from the file
            state = torch.load(path, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            raise RunFolderError(f"{path}: not a checkpoint this trainer wrote; refused to load it (only tensors "
                                 f"and plain containers are read, never pickled objects): {str(e).splitlines()[0]}") from None
        problems = self._check_state(state, model)
        if problems:
            raise RunFolderError(f"{path}: refused, it does not fit this run:\n  - " + "\n  - ".join(problems))
        params = dict(model.named_parameters())
        try:
            opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise RunFolderError(f"{path}: the optimizer state does not fit this model ({e})") from None
        with torch.no_grad():
            for n, v in state["trainable"].items():
                params[n].copy_(v.to(params[n].device))
        torch.set_rng_state(state["torch_rng"])
        return state["step"]

    @staticmethod
    def _check_state(state, model) -> list[str]:
        if not isinstance(state, dict):
            return [f"expected a mapping, got {type(state).__name__}"]
        want = {"step": int, "trainable": dict, "optimizer": dict, "torch_rng": torch.Tensor}
        problems = [f"'{k}' missing or not a {t.__name__}" for k, t in want.items() if not isinstance(state.get(k), t)]
        if problems:
            return problems
        if state["step"] < 1:
            problems.append(f"step {state['step']} < 1")
        own = {n: p for n, p in model.named_parameters() if p.requires_grad}
        got = state["trainable"]
        if set(got) != set(own):
            missing, extra = sorted(set(own) - set(got)), sorted(set(got) - set(own))
            problems.append(f"its parameters are not this model's trainable ones (missing {missing[:3]}, "
                            f"unexpected {extra[:3]})")
        for n, v in got.items():
            if n in own and (not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own[n].shape)):
                problems.append(f"{n}: shape {tuple(getattr(v, 'shape', ()))}, the model has {tuple(own[n].shape)}")
        bad = non_finite((n, v) for n, v in got.items() if isinstance(v, torch.Tensor))
        if bad:
            problems.append(f"non-finite weights in {', '.join(bad[:3])}")
        return problems


def read_config(run_dir: Path) -> MolConfig:
    return load_config(Path(run_dir) / CONFIG)


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / SUMMARY).read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics records (`RunFolder.metrics`): the one reader of metrics.jsonl."""
    return RunFolder(run_dir).metrics()


def train_val(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train records, validation records) in file order; a record without a numeric step is neither."""
    train, val = [], []
    for rec in records:
        if isinstance(rec.get("step"), (int, float)):
            {"train": train, "val": val}.get(rec.get("type"), []).append(rec)
    return train, val
