"""Stage 2: train the student from the teacher cache with the Mixture-of-Losses objective.

No second model is loaded: the KL term reads the base model's top-k labels from the cache.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import cache as C
from .batching import collate, loss_weights, micro_batch_loss, model_hidden, subset_losses
from .config import MolConfig, check_path, expand_path
from .errors import MolError
from .model import (load_model, load_tokenizer, model_fingerprint, pick_device, resolve_model_path,
                    tokenizer_fingerprint)
from .cache.stream import StreamingSequences
from .run_folder import SUMMARY, RunFolder, non_finite

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
    """The base with LoRA adapters (or every parameter trainable). With model.quantization the frozen
    base weights are nf4/int8; everything else stays in the compute dtype, as in the full-precision
    LoRA path (peft's prepare_model_for_kbit_training would upcast the embeddings to fp32: +2.5 GB
    at Qwen3-8B's vocabulary, for no gain in a LoRA that never trains them)."""
    model = load_model(model_path, cfg.model, device=device, quantization=cfg.model.quantization)
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


def tensor_mb(model) -> float:
    """Bytes held by the model's parameters and buffers, a quantized weight's scales included: what
    a GPU's allocator would hold for it (CPU resident memory also counts libraries and freed blocks
    the allocator keeps)."""
    n = 0
    for t in [*model.parameters(), *model.buffers()]:
        n += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)  # bitsandbytes keeps a 4-bit weight's scales beside it
        for extra in (getattr(qs, "absmax", None), getattr(getattr(qs, "state2", None), "absmax", None)):
            if isinstance(extra, torch.Tensor):
                n += extra.numel() * extra.element_size()
    return n / 2**20


def memory_mb(device: torch.device) -> dict:
    """This process's memory now and at its peak: resident set (Linux /proc; the kernel's high-water
    mark) and, on a GPU, torch's allocated bytes. What a user sizing a run needs, in the summary."""
    out = {}
    try:
        status = dict(ln.split(":", 1) for ln in Path("/proc/self/status").read_text().splitlines() if ":" in ln)
        out["rss_mb"] = int(status["VmRSS"].split()[0]) / 1024
        out["peak_rss_mb"] = int(status["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):  # not Linux: the peak only
        import resource

        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        out["cuda_allocated_mb"] = torch.cuda.memory_allocated(device) / 2**20
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _reset_peak_memory(device: torch.device) -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the resident high-water mark := now
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def make_optimizer(t, params: list) -> torch.optim.Optimizer:
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("train.optimizer=adamw8bit needs bitsandbytes: pip install -e '.[qlora]'") from None
        return bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def merged_in_full_precision(cfg: MolConfig, model_path: Path, adapter_dir: Path):
    """The saved adapter merged into the unquantized base (a quantized student's own merge would
    round the result to 4 or 8 bits: the adapter was trained to sit on the full-precision model)."""
    from peft import PeftModel

    base = load_model(model_path, cfg.model, device=torch.device("cpu"))
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


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

    def first(self, value):
        """Rank 0's `value`, on every rank."""
        if self.acc is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

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
        res = micro_batch_loss(model, b, w_ce=w_ce, w_kl=w_kl * b["has_teacher"], chunk_size=chunk)
        (res.loss_sum / n).backward()
        sq = sum(float(p.grad.double().pow(2).sum()) for p in params if p.grad is not None)
        out[f"grad_probe/{name}"] = math.sqrt(sq)
        for p in params:
            p.grad = None
    model.train(was_training)
    return out


def check_cache_paths(cfg: MolConfig) -> None:
    """Refuse a train.cache_dir or teacher.cache_root that is a file (or lies under one), naming the
    setting: the cache lookup would otherwise say "no complete teacher cache ... run make
    teacher-cache", which no teacher pass can fix."""
    if cfg.train.cache_dir:
        check_path(cfg.train.cache_dir, "train.cache_dir")
    else:
        check_path(cfg.teacher.cache_root, "teacher.cache_root")


def open_cache(cfg: MolConfig, model_path: Path, tokenizer, held: C.ReadLocks | None = None) -> C.TeacherCache:
    """The run's cache, checked against the run's model, tokenizer, k and vocabulary, its manifests
    against every shard's footer (sizes, schema, rows, resume records). Each shard's sha256 and
    values are checked by the reader when it first reads the shard, before any of its rows reaches
    a step (hashing the whole cache here took ~1 s a GB before the first step). `held`: shared
    locks on the set and its units, taken before their manifests are read and kept by the caller
    for as long as it reads them (a gc removes none of them meanwhile)."""
    if cfg.train.cache_dir:
        cache_dir = expand_path(cfg.train.cache_dir)
    else:
        cache_dir = C.resolve_cache_key(cfg, tokenizer).cache_dir
    if not (cache_dir / C.MANIFEST).is_file():
        raise TrainingError(f"no complete teacher cache at {cache_dir}: run `make teacher-cache` "
                            f"(python -m stages.teacher_cache CONFIG) with the same model/data/teacher settings")
    cache = C.open_held(cache_dir, held) if held is not None else C.TeacherCache(cache_dir)
    from .labels import config_vocab_size

    cache.check_compatible(model_fp=model_fingerprint(model_path), tokenizer_fp=tokenizer_fingerprint(model_path),
                           k=cfg.teacher.top_k, vocab_size=config_vocab_size(model_path, tokenizer))
    problems = cache.verify(checksums=False, contents=False)
    if problems:
        raise TrainingError(f"teacher cache {cache_dir} failed verification; not training:\n  " + "\n  ".join(problems))
    return cache


@dataclass
class _Data:
    """The run's sequences, streamed, never loaded: an index of 8 bytes a sequence and a bounded
    cache of decoded row groups per split."""

    domain: StreamingSequences
    general: StreamingSequences
    val: StreamingSequences
    plan: DataPlan

    @classmethod
    def open(cls, cache: C.TeacherCache, t) -> "_Data":
        budget = t.reader_cache_mb << 20
        dom = StreamingSequences(cache, "train", "domain", max_cache_bytes=budget)
        gen = StreamingSequences(cache, "train", "general", max_cache_bytes=budget)
        val = StreamingSequences(cache, "val", max_cache_bytes=budget)
        if len(dom) == 0:
            raise TrainingError(f"cache {cache.path} holds no domain training sequences")
        if len(val) == 0:
            raise TrainingError(f"cache {cache.path} holds no validation sequences (each subset's held-out "
                                f"documents are too few for data.val_fraction); validation needs some")
        if t.mode == "mol" and not gen.has_teacher.all():
            raise TrainingError(f"cache {cache.path} lacks teacher labels on general sequences; MoL needs them")
        if t.mode == "mol" and not cache.label_domain:
            log.warning("cache has no teacher labels on domain text (label_domain=false): the α·KL term on "
                        "domain sequences is omitted")
        return cls(dom, gen, val, DataPlan(np.arange(len(dom)), np.arange(len(gen)), t.general_ratio, t.seed))

    def rows(self, corpus: str) -> StreamingSequences:
        return self.domain if corpus == "domain" else self.general

    def close(self) -> None:
        for reader in (self.domain, self.general, self.val):
            reader.close()


def _batch_split(t, world: int) -> tuple[int, int]:
    """(sequences per process, micro-batches per optimizer step)."""
    if t.global_batch % (t.micro_batch * world):
        raise TrainingError(f"train.global_batch ({t.global_batch}) must be a multiple of train.micro_batch x "
                            f"processes ({t.micro_batch} x {world}): the global batch is split across "
                            f"processes, not multiplied")
    per_process = t.global_batch // world
    return per_process, per_process // t.micro_batch


class _Loop:
    """One run's training state and the three things done with it: an optimizer step, a validation,
    a checkpoint. Rank 0 alone writes (metrics, TensorBoard, checkpoints)."""

    def __init__(self, cfg: MolConfig, procs: _Processes, run: RunFolder, data: _Data, model, k: int):
        self.cfg, self.t, self.procs, self.run, self.data, self.model, self.k = cfg, cfg.train, procs, run, data, model, k
        self.device = procs.device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.t, self.params)
        self.per_process, self.accum = _batch_split(self.t, procs.world)
        # DDP wraps the hidden-state forward only: the chunked loss reads the output weight directly
        self.hidden_fn = procs.acc.prepare_model(_HiddenStates(model)) if procs.acc is not None else None
        self.tb = None

    def open_tensorboard(self, start: int) -> None:
        if self.procs.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run.tensorboard_dir), purge_step=start or None)
            except ImportError:  # tensorboard is optional at run time
                pass

    def _stopped(self, what: str, step: int) -> TrainingError:
        latest = self.run.latest_checkpoint()
        return TrainingError(f"{what} at step {step}; stopped, nothing saved from this step. "
                             + (f"The last checkpoint, {latest}, holds finite weights (every saved one is checked)"
                                if latest else "No checkpoint had been written yet"))

    def _items(self, step: int) -> list[tuple[str, int]]:
        rank, n = self.procs.rank, self.per_process
        return self.data.plan.step_items(step, self.t.global_batch)[rank * n:(rank + 1) * n]

    def step(self, step: int, steps: int) -> dict:
        """Optimizer step `step` (0-based) over this rank's share of the global batch."""
        t, procs, device = self.t, self.procs, self.device
        ts = time.time()
        lr = lr_at(step, steps, self.cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        items = self._items(step)
        if step + 1 < steps:  # this rank's next step is decoded while this one trains
            nxt = self._items(step + 1)
            for c in ("domain", "general"):
                self.data.rows(c).prefetch([i for cc, i in nxt if cc == c])
        agg = {f"{q}/{c}": 0.0 for q in ("ce", "kl") for c in ("domain", "general")}
        cnt = {"domain": 0, "general": 0}
        loss_total, tokens = 0.0, 0
        for m in range(self.accum):
            mb = items[m * t.micro_batch:(m + 1) * t.micro_batch]
            b = collate([self.data.rows(c).row(i) for c, i in mb], self.k, device, with_teacher=t.mode == "mol")
            w_ce, w_kl = loss_weights(b, t.alpha, t.mode)
            # gradients are all-reduced once, on the last micro-batch of the step
            last_mb = m == self.accum - 1
            sync = procs.acc.no_sync(self.hidden_fn) if self.hidden_fn is not None and not last_mb else nullcontext()
            with sync:
                out = micro_batch_loss(self.model, b, w_ce=w_ce, w_kl=w_kl, chunk_size=t.loss_chunk,
                                       hidden=None if self.hidden_fn is None
                                       else self.hidden_fn(b[C.INPUT_IDS], b["attention_mask"]))
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
            raise self._stopped(f"non-finite loss {loss} before the update", step + 1)
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip if t.grad_clip > 0 else float("inf")))
        # a finite loss can still have NaN/inf gradients; stepping on them would poison the weights
        if not math.isfinite(gnorm):
            raise self._stopped(f"non-finite gradient norm {gnorm} (loss {loss:.4f}) before the update", step + 1)
        if gnorm == 0.0:
            # no MoL loss has a zero gradient everywhere: the graph is cut (frozen weights, a kernel
            # without a backward), and the run would go on changing nothing
            raise self._stopped("the gradient is exactly zero (no gradient reaches the trainable weights)", step + 1)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        # finite gradients can still overflow the weights (a huge learning rate or weight decay)
        bad = non_finite((n, p) for n, p in self.model.named_parameters() if p.requires_grad)
        if bad:
            raise self._stopped(f"non-finite weights after the update (lr {lr:.3g}) in {', '.join(bad[:3])}"
                                f"{' ...' if len(bad) > 3 else ''}", step + 1)
        rec = {"type": "train", "step": step + 1, "loss": loss, "grad_norm": gnorm, "lr": lr,
               "tokens": tokens, "tokens_per_s": tokens / (time.time() - ts)}
        for c in ("domain", "general"):
            if cnt[c]:
                rec[f"ce/{c}"] = agg[f"ce/{c}"] / cnt[c]
                if t.mode == "mol":
                    rec[f"kl/{c}"] = agg[f"kl/{c}"] / cnt[c]
        return rec

    def log_step(self, rec: dict, steps: int) -> None:
        if not self.procs.main:
            return
        self.run.append_metric(rec)
        if self.tb:
            for key in ("loss", "grad_norm", "lr", "tokens_per_s", "ce/domain", "ce/general", "kl/domain", "kl/general"):
                if key in rec:
                    self.tb.add_scalar(f"train/{key}", rec[key], rec["step"])
        nan = float("nan")
        log.info("step %d/%d loss %.4f ce(d/g) %.3f/%.3f kl(d/g) %.4f/%.4f gnorm %.3f lr %.2e %.0f tok/s",
                 rec["step"], steps, rec["loss"], rec.get("ce/domain", nan), rec.get("ce/general", nan),
                 rec.get("kl/domain", nan), rec.get("kl/general", nan), rec["grad_norm"], rec["lr"], rec["tokens_per_s"])

    def validate(self, step: int) -> dict:
        """Rank 0 validates on the unwrapped model (no collectives); the others wait."""
        rec = {}
        if self.procs.main:
            t = self.t
            res = subset_losses(self.model, self.data.val, self.k, self.device, batch_size=self.cfg.eval.batch_size,
                                chunk=t.loss_chunk, max_per_subset=self.cfg.eval.max_val_sequences,
                                per_sequence=True)
            rec = {"type": "val", "step": step, **res}
            if t.grad_probe_sequences:
                probe_rows = [self.data.general.row(i) for i in range(min(t.grad_probe_sequences, len(self.data.general)))]
                rec.update(grad_probe(self.model, self.params, probe_rows, self.k, t.loss_chunk, self.device))
            self.run.append_metric(rec)
            if self.tb:
                for key, v in rec.items():
                    if key not in ("type", "step") and not key.startswith(("tokens/", "ce_seq/")):
                        self.tb.add_scalar(f"val/{key}", v, step)
            log.info("val step %d: %s", step, "  ".join(f"{q}={v:.4f}" for q, v in res.items() if q.startswith("ce/")))
            if step == 0 and self.cfg.model.quantization != "none":
                log.info("quantization drift (%s student's KL to the full-precision base at step 0): %s",
                         self.cfg.model.quantization,
                         "  ".join(f"{q}={v:.4f}" for q, v in res.items() if q.startswith("kl_to_base/")))
        self.procs.barrier()
        return rec

    def checkpoint(self, step: int) -> None:
        if self.procs.main:
            self.run.save_checkpoint(step, self.model, self.opt)
        self.procs.barrier()

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        self.data.close()


def train(cfg: MolConfig, make_bar: Optional[MakeBar] = None, stop_after: Optional[int] = None) -> Path:
    """Run Stage 2; returns the run folder. `stop_after` ends early after that step (tests of resume).

    Everything a run could refuse is checked before the model is loaded, in order of cost: the batch
    split, the run folder (lock, fresh or resumable with the settings it started with), the cache
    (checksums and contract) and, on resume, that it is the cache the run started from, key and
    bytes. The cache's set and units are locked for reading until the run ends."""
    make_bar = make_bar or (lambda total, desc: (lambda n: None))
    t = cfg.train
    procs = _Processes(pick_device(cfg.model.device))
    _batch_split(t, procs.world)
    check_path(t.out_dir, "train.out_dir")
    check_cache_paths(cfg)
    run = RunFolder.for_config(cfg)
    # the cache's folders are locked for reading for the whole run: a gc skips them
    with run.lock(main=procs.main, share=procs.first), C.ReadLocks() as held:
        changes = run.check_resume(cfg) if t.resume else run.check_fresh()
        if t.resume and run.finished():
            log.info("%s finished already (%s exists): nothing to resume", run.path, SUMMARY)
            return run.path
        procs.barrier()  # every process has checked before rank 0 writes anything
        model_path = resolve_model_path(cfg.model.name)
        tokenizer = load_tokenizer(model_path)
        cache = open_cache(cfg, model_path, tokenizer, held)
        fingerprint, content = cache.fingerprint, cache.content_digests()
        if t.resume:
            run.check_cache(fingerprint, content)
        data = _Data.open(cache, t)
        steps = total_steps(cfg, data.plan)

        torch.manual_seed(t.seed)
        model = build_student(cfg, model_path, procs.device)
        memory = {"after_model_load": memory_mb(procs.device), "model_tensors_mb": tensor_mb(model)}
        _reset_peak_memory(procs.device)  # from here on the peak is training's, not loading's
        loop = _Loop(cfg, procs, run, data, model, cache.k)
        if procs.main and not t.resume:
            # only once the model and optimizer exist: a refused load leaves no run folder behind
            run.start(cfg, fingerprint, cache.path, content)
        start = 0
        if t.resume:
            if run.latest_checkpoint() is not None:
                start = run.load_checkpoint(model, loop.opt)
                log.info("resumed %s at step %d of %d", run.path, start, steps)
            if procs.main:
                run.record_resume(start, changes)
                run.truncate_metrics(start, steps)
        loop.open_tensorboard(start)
        log.info("run %s: %d steps x %d sequences (%d domain + %d general per epoch), %s, %.2fM trainable params%s",
                 run.path, steps, t.global_batch, len(data.domain), data.plan.general_per_epoch, t.finetune,
                 sum(p.numel() for p in loop.params) / 1e6,
                 f", {procs.world} processes x {loop.per_process} sequences" if procs.world > 1 else "")

        if start == 0:
            loop.validate(0)
        bar = make_bar(steps, "train") if procs.main else (lambda n: None)
        bar(start)
        t0, last = time.time(), {}
        for step in range(start, steps):
            last = loop.step(step, steps)
            last["elapsed_s"] = time.time() - t0
            loop.log_step(last, steps)
            bar(1)
            done = step + 1
            if t.eval_every and done % t.eval_every == 0 and done != steps:
                loop.validate(done)
            if (t.save_every and done % t.save_every == 0) or done == steps or done == stop_after:
                loop.checkpoint(done)
            if stop_after is not None and done >= stop_after and done != steps:
                loop.close()
                return run.path

        memory["end"] = memory_mb(procs.device)
        final_val = loop.validate(steps)
        loop.close()
        if procs.main:
            run.save_weights(model, tokenizer, t.finetune, t.merge,
                             merge=(lambda adapter: merged_in_full_precision(cfg, model_path, adapter))
                             if cfg.model.quantization != "none" else None)
            run.write_summary({
                "run_dir": str(run.path), "cache_dir": str(cache.path), "cache_fingerprint": fingerprint,
                "model_path": str(model_path), "finetune": t.finetune, "mode": t.mode, "alpha": t.alpha,
                "general_ratio": t.general_ratio, "final_step": steps, "train_seconds": time.time() - t0,
                "domain_kl_labels": cache.label_domain, "last_train": last, "final_val": final_val,
                "quantization": cfg.model.quantization, "optimizer": t.optimizer, "memory": memory,
            })
            log.info("run finished: %s", run.path)
        procs.barrier()
    return run.path
