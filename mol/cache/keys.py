"""Keys and names: what a unit and a set depend on (`unit_key`, `set_key`), their fingerprints and
folder names, resolved from a config and the files on disk. The one part of the cache that reads a
config, a model folder or a corpus (file hashes only, no model load)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import MolConfig, SourceConfig, expand_path
from ..corpora import detect_format, source_caps, source_fingerprint
from ..errors import MissingInput
from ..model import load_tokenizer, model_fingerprint, resolve_model_path, tokenizer_fingerprint
from .schema import SCHEMA_VERSION, SETS_DIR, UNITS_DIR

def unit_key(cfg: MolConfig, src: SourceConfig, *, model_fp: str, tokenizer_fp: str, chat_template: str | None,
             source_fp: str, source_format: str) -> dict:
    """Everything one source's unit depends on; its hash names the unit folder."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model_fingerprint": model_fp,
        "tokenizer_fingerprint": tokenizer_fp,
        "chat_template": chat_template,
        "chat_template_kwargs": cfg.model.chat_template_kwargs,
        "dtype": cfg.model.dtype,
        "backend": cfg.teacher.backend,
        # vLLM caches from prompt log-probs (before 2026-12-04) had a residual off by up to 54x at small r
        **({"vllm_labels": "hidden-states"} if cfg.teacher.backend == "vllm" else {}),
        "top_k": cfg.teacher.top_k,
        "labelled": src.corpus == "general" or cfg.teacher.label_domain,
        "rows_per_shard": cfg.teacher.rows_per_shard,
        "packing": {"max_seq_len": cfg.data.max_seq_len, "val_fraction": cfg.data.val_fraction,
                    "segment_bytes": cfg.data.segment_bytes, "on_bad_record": cfg.data.on_bad_record},
        "source": {"corpus": src.corpus, "subset": src.subset, "format": source_format, "sha256": source_fp,
                   **source_caps(src, cfg.data),
                   # only when set, so that every cache made before the field existed keeps its key
                   **({"heldout": True} if src.heldout else {})},
    }


def row_group_rows(cfg: MolConfig) -> int:
    return max(1, cfg.teacher.row_group_tokens // cfg.data.max_seq_len)


def fingerprint(key) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(name).name)[:48]


@dataclass
class ResolvedUnit:
    """One source resolved against the files on disk: its key and where its unit lives."""

    source: SourceConfig
    key: dict
    fingerprint: str
    dir: Path

    @property
    def labelled(self) -> bool:
        return self.key["labelled"]

    @property
    def name(self) -> str:
        return self.dir.name


@dataclass
class ResolvedSet:
    """A config resolved against the files on disk: its units, and the set folder naming them (the
    set a `TeacherCache` opens once its manifest is written)."""

    model_path: Path
    units: list[ResolvedUnit]
    key: dict
    fingerprint: str
    cache_dir: Path  # the set folder, sets/<model>-<fp16>

    @property
    def k(self) -> int:
        """teacher.top_k, as keyed."""
        return self.key["top_k"]


def set_key(units: list[ResolvedUnit], cfg: MolConfig, model_fp: str, tokenizer_fp: str) -> dict:
    return {"schema_version": SCHEMA_VERSION, "model_fingerprint": model_fp, "tokenizer_fingerprint": tokenizer_fp,
            "top_k": cfg.teacher.top_k, "label_domain": cfg.teacher.label_domain,
            "packing": {"max_seq_len": cfg.data.max_seq_len},
            "units": [u.fingerprint for u in units]}


def resolve_cache_key(cfg: MolConfig, tokenizer=None) -> ResolvedSet:
    """Fingerprint the model, tokenizer, template and every source (file hashes only, no model load)."""
    model_path = resolve_model_path(cfg.model.name)
    tokenizer = tokenizer or load_tokenizer(model_path)
    model_fp, tok_fp = model_fingerprint(model_path), tokenizer_fingerprint(model_path)
    root = expand_path(cfg.teacher.cache_root)
    units = []
    for s in cfg.data.sources:
        p = expand_path(s.path)
        if not p.exists():
            raise MissingInput(f"{p}: source file does not exist (corpus {s.corpus}, subset {s.subset}); "
                                    f"for the default data run `make data`")
        key = unit_key(cfg, s, model_fp=model_fp, tokenizer_fp=tok_fp, chat_template=tokenizer.chat_template,
                       source_fp=source_fingerprint(p), source_format=detect_format(p, s.format))
        fp = fingerprint(key)
        units.append(ResolvedUnit(s, key, fp, root / UNITS_DIR / f"{s.corpus}-{_slug(s.subset)}-{fp[:16]}"))
    key = set_key(units, cfg, model_fp, tok_fp)
    fp = fingerprint(key)
    return ResolvedSet(model_path, units, key, fp, root / SETS_DIR / f"{_slug(cfg.model.name)}-{fp[:16]}")

