"""Stage 2: train the student from the teacher cache with the Mixture-of-Losses objective.

No second model is loaded: the KL term reads the base model's top-k labels from the cache.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import cache as C
from .batching import collate, model_hidden, output_weight, subset_losses
from .config import MolConfig, dump_config, expand_path
from .errors import MolError
from .losses import chunked_mol_loss, mol_weights
from .model import load_model, load_tokenizer, model_fingerprint, pick_device, tokenizer_fingerprint
from .reader import StreamingSequences

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
MakeBar = Callable[[int, str], Progress]


class TrainingError(MolError, RuntimeError):
    """Training cannot start or cannot go on (bad cache, non-finite loss...)."""


# --------------------------------------------------------------------------- data order


@dataclass
class DataPlan:
    """The deterministic order of training sequences: step s uses stream[s*G:(s+1)*G].

    Each epoch is every domain training sequence once plus round(n_domain x general_ratio)
    general ones drawn from the general pool without replacement (the pool is cycled in fresh
    permutations when it is smaller than needed), all shuffled together.
    """

    domain_idx: np.ndarray
    general_idx: np.ndarray
    general_ratio: float
    seed: int

    @property
    def per_epoch(self) -> int:
        return len(self.domain_idx) + self.general_per_epoch

    @property
    def general_per_epoch(self) -> int:
        return int(round(len(self.domain_idx) * self.general_ratio))

    def epoch(self, e: int) -> list[tuple[str, int]]:
        rng = np.random.default_rng([self.seed, e])
        need = self.general_per_epoch
        gen = []
        # the general draw continues across epochs, so a large pool is walked through before repeating
        start = e * need
        cycle, off = divmod(start, max(len(self.general_idx), 1))
        while len(gen) < need:
            perm = np.random.default_rng([self.seed, 1_000_003, cycle]).permutation(self.general_idx)
            take = perm[off: off + need - len(gen)]
            gen += [("general", int(i)) for i in take]
            cycle, off = cycle + 1, 0
        items = [("domain", int(i)) for i in self.domain_idx] + gen
        order = rng.permutation(len(items))
        return [items[i] for i in order]

    def step_items(self, step: int, global_batch: int) -> list[tuple[str, int]]:
        a, b = step * global_batch, (step + 1) * global_batch
        out, e = [], a // self.per_epoch
        while len(out) < global_batch:
            ep = self.epoch(e)
            lo = max(a - e * self.per_epoch, 0)
            hi = min(b - e * self.per_epoch, self.per_epoch)
            out += ep[lo:hi]
            e += 1
        return out


def total_steps(cfg: MolConfig, plan: DataPlan) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, int(round(cfg.train.epochs * plan.per_epoch / cfg.train.global_batch)))


def lr_at(step: int, steps: int, cfg: MolConfig) -> float:
    """Linear warm-up for warmup_ratio of the steps, then cosine decay to min_lr_ratio x lr."""
    t = cfg.train
    warm = int(math.ceil(t.warmup_ratio * steps))
    if step < warm:
        return t.lr * (step + 1) / warm
    prog = (step - warm) / max(steps - warm, 1)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0))))


# --------------------------------------------------------------------------- model


def build_student(cfg: MolConfig, model_path: Path, device: torch.device):
    model = load_model(model_path, cfg.model, device=device)
    if cfg.train.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lc = cfg.train.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.finetune == "lora":
            model.enable_input_require_grads()
    model.train()
    return model


def trainable_state(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- checkpoints


def _ckpt_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, model, opt, keep: int = 2) -> Path:
    """Write to a temp folder, then rename: `latest` only ever points at a complete checkpoint."""
    root = _ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    # temp folders of a killed save (any pid) are never a checkpoint; one trainer per run folder
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    torch.save({"step": step, "trainable": trainable_state(model), "optimizer": opt.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
    with open(tmp / "state.pt", "rb") as f:
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    C.write_atomic(root / "latest", final.name.encode())
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path, model, opt) -> int:
    root = _ckpt_root(run_dir)
    latest = root / "latest"
    if not latest.is_file():
        raise TrainingError(f"resume=true but {run_dir} has no checkpoint")
    path = root / latest.read_text().strip() / "state.pt"
    try:
        # tensors and plain containers only: unpickling anything else could run code from the file
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise TrainingError(f"{path}: not a checkpoint this trainer wrote; refused to load it (only tensors "
                            f"and plain containers are read, never pickled objects): {str(e).splitlines()[0]}") from None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state["trainable"].items():
            params[n].copy_(v.to(params[n].device))
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


# --------------------------------------------------------------------------- the loop


class _Processes:
    """This process's place in a multi-process run (`accelerate launch` / torchrun: WORLD_SIZE > 1).

    One process: no accelerate object, nothing changes. Several: each process takes its own slice of
    every optimizer step's global batch (split, not multiplied), the final hidden states are computed
    through accelerate's DDP wrapper so gradients are all-reduced once per optimizer step (no_sync on
    the micro-batches before the last), and rank 0 alone validates, checkpoints and writes files.
    """

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.acc = None
        self.rank = 0
        self.device = device
        if self.world > 1:
            from accelerate import Accelerator

            self.acc = Accelerator(cpu=device.type == "cpu")
            self.rank, self.world, self.device = self.acc.process_index, self.acc.num_processes, self.acc.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()

    def sum(self, values: list[float]) -> list[float]:
        if self.acc is None:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.acc.reduce(t, reduction="sum").tolist()


class _HiddenStates(torch.nn.Module):
    """The student's final hidden states as a module's forward, so DDP sees the forward it syncs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return model_hidden(self.model, {C.INPUT_IDS: input_ids, "attention_mask": attention_mask})


def grad_probe(model, params: list, rows: list[dict], k: int, chunk: int, device: torch.device) -> dict:
    """Global gradient norms of the mean-per-sequence CE and truncated KL, each alone and unweighted,
    on the same sequences (dropout off). Leaves every .grad as None: call it between optimizer steps."""
    was_training = model.training
    model.eval()
    b = collate(rows, k, device, with_teacher=True)
    n = len(rows)
    ones, zeros = torch.ones(n, device=device), torch.zeros(n, device=device)
    out = {}
    for name, w_ce, w_kl in (("ce", ones, zeros), ("kl", zeros, ones)):
        h = model_hidden(model, b)[:, :-1]
        res = chunked_mol_loss(h, output_weight(model), b["target_ids"], b["mask"], b[C.TOPK_IDS],
                               b[C.TOPK_PROBS], b[C.RESIDUAL], w_ce, w_kl * b["has_teacher"], chunk_size=chunk)
        (res.loss_sum / n).backward()
        sq = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)
        out[f"grad_probe/{name}"] = math.sqrt(sq)
        for p in params:
            p.grad = None
    model.train(was_training)
    return out


def default_run_name(cfg: MolConfig) -> str:
    t = cfg.train
    return f"{t.mode}-a{t.alpha:g}-r{t.general_ratio:g}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_run_dir(cfg: MolConfig) -> Path:
    out = expand_path(cfg.train.out_dir)
    if cfg.train.run_name:
        return out / cfg.train.run_name
    if cfg.train.resume:
        prefix = f"{cfg.train.mode}-a{cfg.train.alpha:g}-r{cfg.train.general_ratio:g}-"
        runs = sorted(p for p in out.glob(prefix + "*") if (p / "checkpoints" / "latest").is_file())
        if not runs:
            raise TrainingError(f"resume=true: no run in {out} named {prefix}* has a checkpoint; set train.run_name")
        return runs[-1]
    return out / default_run_name(cfg)


def open_cache(cfg: MolConfig, model_path: Path, tokenizer) -> C.TeacherCache:
    """The run's cache, verified (checksums) and checked against the run's model, tokenizer and k."""
    if cfg.train.cache_dir:
        cache_dir = expand_path(cfg.train.cache_dir)
    else:
        cache_dir = C.resolve_cache_key(cfg, tokenizer).cache_dir
    if not (cache_dir / C.MANIFEST).is_file():
        raise TrainingError(f"no complete teacher cache at {cache_dir}: run `make teacher-cache` "
                            f"(python -m stages.teacher_cache CONFIG) with the same model/data/teacher settings")
    cache = C.TeacherCache(cache_dir)
    cache.check_compatible(model_fp=model_fingerprint(model_path), tokenizer_fp=tokenizer_fingerprint(model_path),
                           k=cfg.teacher.top_k)
    problems = cache.verify()
    if problems:
        raise TrainingError(f"teacher cache {cache_dir} failed verification; not training:\n  " + "\n  ".join(problems))
    return cache


def _jsonl_append(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _truncate_metrics(path: Path, step: int, final_step: int) -> None:
    """On resume from the checkpoint at `step` (0: none), drop every line the restarted run writes
    again: all lines after the checkpoint, the step-0 validation when there is no checkpoint, and
    the final validation when the checkpoint is the last step (it runs after that checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue  # blank, or the last line torn by the kill
        s = rec.get("step", -1)
        if s < step or (s == step and step > 0 and not (rec.get("type") == "val" and step == final_step)):
            keep.append(ln)
    C.write_atomic(path, ("\n".join(keep) + "\n" if keep else "").encode())


def train(cfg: MolConfig, make_bar: Optional[MakeBar] = None, stop_after: Optional[int] = None) -> Path:
    """Run Stage 2; returns the run folder. `stop_after` ends early after that step (tests of resume)."""
    from .model import resolve_model_path

    make_bar = make_bar or (lambda total, desc: (lambda n: None))
    t = cfg.train
    procs = _Processes(pick_device(cfg.model.device))
    device = procs.device
    model_path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(model_path)
    cache = open_cache(cfg, model_path, tokenizer)
    k = cache.k

    # streamed, not loaded: an index of 8 bytes a sequence and a bounded cache of decoded row groups
    budget = t.reader_cache_mb << 20
    dom = StreamingSequences(cache, "train", "domain", max_cache_bytes=budget)
    gen = StreamingSequences(cache, "train", "general", max_cache_bytes=budget)
    val = StreamingSequences(cache, "val", max_cache_bytes=budget)
    if t.mode == "mol" and not gen.has_teacher.all():
        raise TrainingError(f"cache {cache.path} lacks teacher labels on general sequences; MoL needs them")
    if t.mode == "mol" and not cache.label_domain:
        log.warning("cache has no teacher labels on domain text (label_domain=false): the α·KL term on "
                    "domain sequences is omitted")
    rows = {"domain": dom, "general": gen}
    plan = DataPlan(np.arange(len(dom)), np.arange(len(gen)), t.general_ratio, t.seed)
    steps = total_steps(cfg, plan)
    if t.global_batch % (t.micro_batch * procs.world):
        raise TrainingError(f"train.global_batch ({t.global_batch}) must be a multiple of train.micro_batch x "
                            f"processes ({t.micro_batch} x {procs.world}): the global batch is split across "
                            f"processes, not multiplied")
    per_process = t.global_batch // procs.world
    accum = per_process // t.micro_batch

    run_dir = resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    if not t.resume and (metrics_path.exists() or _ckpt_root(run_dir).exists()):
        raise TrainingError(f"{run_dir} already holds a run; set train.resume=true or another train.run_name")
    procs.barrier()  # every process has checked before rank 0 writes anything
    if procs.main:
        dump_config(cfg, run_dir / "config.yaml")

    torch.manual_seed(t.seed)
    model = build_student(cfg, model_path, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    start = 0
    if t.resume:
        if (_ckpt_root(run_dir) / "latest").is_file():
            start = load_checkpoint(run_dir, model, opt)
            log.info("resumed %s at step %d of %d", run_dir, start, steps)
        if procs.main:
            _truncate_metrics(metrics_path, start, steps)
    n_trainable = sum(p.numel() for p in params)
    log.info("run %s: %d steps x %d sequences (%d domain + %d general per epoch), %s, %.2fM trainable params%s",
             run_dir, steps, t.global_batch, len(dom), plan.general_per_epoch, t.finetune, n_trainable / 1e6,
             f", {procs.world} processes x {per_process} sequences" if procs.world > 1 else "")
    # DDP wraps the hidden-state forward only: the chunked loss reads the output weight directly
    hidden_fn = procs.acc.prepare_model(_HiddenStates(model)) if procs.acc is not None else None

    tb = None
    try:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(run_dir / "tb"), purge_step=start or None) if procs.main else None
    except ImportError:  # tensorboard is optional at run time
        pass

    def validate(step: int) -> dict:
        """Rank 0 validates on the unwrapped model (no collectives); the others wait."""
        rec = _validate(step) if procs.main else {}
        procs.barrier()
        return rec

    def _validate(step: int) -> dict:
        res = subset_losses(model, val, k, device, batch_size=cfg.eval.batch_size, chunk=t.loss_chunk,
                            max_per_subset=cfg.eval.max_val_sequences)
        rec = {"type": "val", "step": step, **res}
        if t.grad_probe_sequences:
            probe_rows = [gen.row(i) for i in range(min(t.grad_probe_sequences, len(gen)))]
            rec.update(grad_probe(model, params, probe_rows, k, t.loss_chunk, device))
        _jsonl_append(metrics_path, rec)
        if tb:
            for key, v in rec.items():
                if key not in ("type", "step") and not key.startswith("tokens/"):
                    tb.add_scalar(f"val/{key}", v, step)
        log.info("val step %d: %s", step, "  ".join(f"{k_}={v:.4f}" for k_, v in res.items() if k_.startswith("ce/")))
        return rec

    if start == 0:
        validate(0)
    weight = output_weight(model)
    bar = make_bar(steps, "train") if procs.main else (lambda n: None)
    bar(start)
    t0 = time.time()
    last = {}
    for step in range(start, steps):
        ts = time.time()
        lr = lr_at(step, steps, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        items = plan.step_items(step, t.global_batch)
        items = items[procs.rank * per_process:(procs.rank + 1) * per_process]
        if step + 1 < steps:  # this rank's next step is decoded while this one trains
            nxt = plan.step_items(step + 1, t.global_batch)[procs.rank * per_process:(procs.rank + 1) * per_process]
            for c in ("domain", "general"):
                rows[c].prefetch([i for cc, i in nxt if cc == c])
        agg = {f"{q}/{c}": 0.0 for q in ("ce", "kl") for c in ("domain", "general")}
        cnt = {"domain": 0, "general": 0}
        loss_total, tokens = 0.0, 0
        for m in range(accum):
            mb = items[m * t.micro_batch:(m + 1) * t.micro_batch]
            batch_rows = [rows[c].row(i) for c, i in mb]
            b = collate(batch_rows, k, device, with_teacher=t.mode == "mol")
            w_ce, w_kl = mol_weights(b["is_domain"], t.alpha, t.mode)
            w_ce, w_kl = w_ce.to(device), (w_kl.to(device) * b["has_teacher"])
            # gradients are all-reduced once, on the last micro-batch of the step
            sync = procs.acc.no_sync(hidden_fn) if hidden_fn is not None and m < accum - 1 else nullcontext()
            with sync:
                h = (hidden_fn(b[C.INPUT_IDS], b["attention_mask"]) if hidden_fn is not None
                     else model_hidden(model, b))[:, :-1]
                out = chunked_mol_loss(h, weight, b["target_ids"], b["mask"], b.get(C.TOPK_IDS),
                                       b.get(C.TOPK_PROBS), b.get(C.RESIDUAL), w_ce, w_kl, chunk_size=t.loss_chunk)
                # normalised once per optimizer step: every micro-batch divides by the global batch;
                # DDP averages over processes, so each process's share is scaled back up by their number
                (out.loss_sum * (procs.world / t.global_batch)).backward()
            loss_total += float(out.loss_sum.detach())
            tokens += int(out.n_tokens.sum())
            for j, (c, _) in enumerate(mb):
                agg[f"ce/{c}"] += float(out.ce[j])
                agg[f"kl/{c}"] += float(out.kl[j])
                cnt[c] += 1
        if procs.world > 1:
            keys = list(agg)
            summed = procs.sum([loss_total, tokens, cnt["domain"], cnt["general"]] + [agg[q] for q in keys])
            loss_total, tokens, cnt["domain"], cnt["general"] = summed[0], int(summed[1]), summed[2], summed[3]
            agg = dict(zip(keys, summed[4:]))
        loss = loss_total / t.global_batch
        if not math.isfinite(loss):
            raise TrainingError(f"non-finite loss {loss} at step {step + 1}; stopped before the update. The last "
                                f"good checkpoint (if any) is in {_ckpt_root(run_dir)}")
        gnorm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        # a finite loss can still have NaN/inf gradients; stepping on them would poison the weights
        # and then the next checkpoint
        if not math.isfinite(float(gnorm)):
            raise TrainingError(f"non-finite gradient norm {float(gnorm)} at step {step + 1} (loss {loss:.4f}); "
                                f"stopped before the update. The last good checkpoint (if any) is in "
                                f"{_ckpt_root(run_dir)}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - ts
        rec = {"type": "train", "step": step + 1, "loss": loss, "grad_norm": float(gnorm), "lr": lr,
               "tokens": tokens, "tokens_per_s": tokens / dt, "elapsed_s": time.time() - t0}
        for c in ("domain", "general"):
            if cnt[c]:
                rec[f"ce/{c}"] = agg[f"ce/{c}"] / cnt[c]
                if t.mode == "mol":
                    rec[f"kl/{c}"] = agg[f"kl/{c}"] / cnt[c]
        if procs.main:
            _jsonl_append(metrics_path, rec)
        if tb:
            for key in ("loss", "grad_norm", "lr", "tokens_per_s", "ce/domain", "ce/general", "kl/domain", "kl/general"):
                if key in rec:
                    tb.add_scalar(f"train/{key}", rec[key], step + 1)
        if procs.main:
            log.info("step %d/%d loss %.4f ce(d/g) %.3f/%.3f kl(d/g) %.4f/%.4f gnorm %.3f lr %.2e %.0f tok/s",
                 step + 1, steps, loss, rec.get("ce/domain", float("nan")), rec.get("ce/general", float("nan")),
                 rec.get("kl/domain", float("nan")), rec.get("kl/general", float("nan")), rec["grad_norm"], lr,
                 rec["tokens_per_s"])
        bar(1)
        last = rec
        done = step + 1
        if (t.eval_every and done % t.eval_every == 0) and done != steps:
            validate(done)
        if (t.save_every and done % t.save_every == 0) or done == steps or done == stop_after:
            if procs.main:
                save_checkpoint(run_dir, done, model, opt)
            procs.barrier()
        if stop_after is not None and done >= stop_after and done != steps:
            for reader in (dom, gen, val):
                reader.close()
            return run_dir

    final_val = validate(steps)
    if tb:
        tb.close()
    for reader in (dom, gen, val):
        reader.close()
    if procs.main:
        _save_outputs(cfg, run_dir, model, tokenizer, model_path, cache, steps, last, final_val, time.time() - t0)
    procs.barrier()
    return run_dir


def _save_outputs(cfg, run_dir, model, tokenizer, model_path, cache, steps, last, final_val, seconds) -> None:
    t = cfg.train
    if t.finetune == "lora":
        model.save_pretrained(run_dir / "adapter")
        if t.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(run_dir / "merged")
            tokenizer.save_pretrained(run_dir / "merged")
    else:
        model.save_pretrained(run_dir / "model")
        tokenizer.save_pretrained(run_dir / "model")
    summary = {
        "run_dir": str(run_dir), "cache_dir": str(cache.path), "cache_fingerprint": cache.manifest["fingerprint"],
        "model_path": str(model_path), "finetune": t.finetune, "mode": t.mode, "alpha": t.alpha,
        "general_ratio": t.general_ratio, "final_step": steps, "train_seconds": seconds,
        "domain_kl_labels": cache.label_domain, "last_train": last, "final_val": final_val,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("run finished: %s", run_dir)
