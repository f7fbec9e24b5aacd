"""Both manifests and the dataset card: assembled here from the facts the teacher pass gathers
(`shard_entry`, `unit_manifest`, `set_manifest`: pure functions, the manifest's shape in one place),
written and read here, and checked here when read (`unit_manifest_problems`, `set_manifest_problems`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..files import write_atomic
from .schema import CARD, CORPUS, INPUT_IDS, MANIFEST, RESIDUAL, SCHEMA_VERSION, SEQ_ID, SETS_DIR, SPLIT, SUBSET, \
    TOPK_IDS, TOPK_PROBS, UNITS_DIR, CacheError, id_dtype, parse_shard_name

def write_manifest(folder: Path, manifest: dict) -> None:
    try:
        write_atomic(folder / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())
    except OSError as e:
        raise CacheError(f"{folder / MANIFEST}: could not write the manifest ({e}); every shard is kept "
                         f"and the next run only writes the manifest") from e


def read_manifest(folder: Path, what: str) -> dict:
    """A folder's manifest.json, of `what` kind ("unit" or "set") and this schema version, else a CacheError."""
    mf = folder / MANIFEST
    if not mf.is_file():
        raise CacheError(f"{folder}: no {MANIFEST}; the teacher pass did not finish (run `make teacher-cache`)")
    try:
        m = json.loads(mf.read_text())
    except (ValueError, OSError) as e:  # invalid JSON or UTF-8, or a file that cannot be read
        raise CacheError(f"{mf}: unreadable manifest ({e})") from None
    except RecursionError:  # valid JSON nested deeper than the parser's stack: no manifest is
        raise CacheError(f"{mf}: unreadable manifest (nested deeper than any manifest is)") from None
    version = m.get("schema_version") if isinstance(m, dict) else None
    if version != SCHEMA_VERSION:
        raise CacheError(f"{folder}: schema version {version} != {SCHEMA_VERSION} that this code reads; "
                         f"rebuild the cache (make teacher-cache)")
    if m.get("kind") != what:
        raise CacheError(f"{mf}: a {m.get('kind')!r} manifest where a {what!r} belongs")
    return m


def _type_problems(obj: dict, fields: dict, prefix: str = "") -> list[str]:
    return [f"'{prefix}{k}' missing or not a {t.__name__}" for k, t in fields.items()
            if not isinstance(obj.get(k), t) or (t is int and isinstance(obj.get(k), bool))]


_UNIT_FIELDS = {"fingerprint": str, "key": dict, "model": dict, "counts": dict, "totals": dict,
                "residual": dict, "shards": list}
_UNIT_KEY_FIELDS = {"model_fingerprint": str, "tokenizer_fingerprint": str, "top_k": int, "labelled": bool,
                    "rows_per_shard": int, "source": dict}
_SHARD_FIELDS = {"file": str, "segment": int, "part": int, "rows": int, "tokens": int, "bytes": int,
                 "sha256": str}
_SET_FIELDS = {"fingerprint": str, "key": dict, "model": dict, "counts": dict, "totals": dict,
               "residual": dict, "units": list}
_SET_KEY_FIELDS = {"model_fingerprint": str, "tokenizer_fingerprint": str, "top_k": int, "label_domain": bool}
_SET_UNIT_FIELDS = {"dir": str, "fingerprint": str, "corpus": str, "subset": str}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shard_entry_problems(sh: dict) -> list[str]:
    """What is wrong with one well-typed shard entry: its name, negative counts, val_rows the
    reader could not index with, a row group size it could not step by (verify compares the rest
    with the shard itself)."""
    out = []
    if Path(sh["file"]).name != sh["file"] or parse_shard_name(sh["file"]) != (sh["segment"], sh["part"]):
        out.append(f"file {sh['file']!r} is not segment {sh['segment']} part {sh['part']}'s name")
    neg = [f for f in ("segment", "part", "rows", "tokens", "bytes") if sh[f] < 0]
    if neg:
        out.append("negative " + ", ".join(neg))
    vr = sh.get("val_rows")
    if vr is not None and not (isinstance(vr, list) and all(_is_int(r) and 0 <= r < sh["rows"] for r in vr)
                               and all(a < b for a, b in zip(vr, vr[1:]))):
        out.append(f"val_rows is not an ascending list of row indices below {sh['rows']}")
    rg = sh.get("rows_per_group")
    if rg is not None and not (_is_int(rg) and rg > 0):
        out.append(f"rows_per_group {rg!r} is not a positive integer")
    return out


def unit_manifest_problems(m) -> list[str]:
    """What a readable unit manifest lacks for the reader and the CLIs to use it (empty = usable)."""
    out = _type_problems(m, _UNIT_FIELDS)
    if isinstance(m.get("key"), dict):
        out += _type_problems(m["key"], _UNIT_KEY_FIELDS, "key.")
        if isinstance(m["key"].get("source"), dict):
            out += _type_problems(m["key"]["source"], {"corpus": str, "subset": str}, "key.source.")
        if _is_int(m["key"].get("top_k")) and m["key"]["top_k"] < 1:
            out.append(f"'key.top_k' {m['key']['top_k']} is not positive")
        if _is_int(m["key"].get("rows_per_shard")) and m["key"]["rows_per_shard"] < 1:
            out.append(f"'key.rows_per_shard' {m['key']['rows_per_shard']} is not positive")
    if isinstance(m.get("model"), dict):
        out += _type_problems(m["model"], {"vocab_size": int}, "model.")
    for i, sh in enumerate(m.get("shards") if isinstance(m.get("shards"), list) else []):
        bad = _type_problems(sh, _SHARD_FIELDS) if isinstance(sh, dict) else ["an object"]
        bad = bad or _shard_entry_problems(sh)
        if bad:
            out.append(f"shards[{i}]: " + "; ".join(bad))
    return out


def set_manifest_problems(m) -> list[str]:
    """What a readable set manifest lacks for the trainer and the CLIs to use it (empty = usable)."""
    out = _type_problems(m, _SET_FIELDS)
    if isinstance(m.get("key"), dict):
        out += _type_problems(m["key"], _SET_KEY_FIELDS, "key.")
    if isinstance(m.get("model"), dict):
        out += _type_problems(m["model"], {"vocab_size": int}, "model.")
    for i, u in enumerate(m.get("units") if isinstance(m.get("units"), list) else []):
        bad = _type_problems(u, _SET_UNIT_FIELDS) if isinstance(u, dict) else ["an object"]
        if bad:
            out.append(f"units[{i}]: " + "; ".join(bad))
        elif Path(u["dir"]).parts[:1] != (UNITS_DIR,) or len(Path(u["dir"]).parts) != 2:
            out.append(f"units[{i}]: dir {u['dir']!r} is not units/<name>")
    return out


def shard_entry(*, file: str, segment: int, part: int, rows: int, tokens: int, bytes: int, sha256: str,
                rows_per_group: int, val_rows) -> dict:
    """One shard's record in its unit manifest's `shards` list: its file name (shard_name(segment,
    part)), rows, tokens, size and sha256 (what verify checks), rows per Parquet row group, and where
    the val rows are (Stage 2's reader builds its index from these records alone)."""
    return {"file": file, "segment": segment, "part": part, "rows": rows, "tokens": tokens, "bytes": bytes,
            "sha256": sha256, "rows_per_group": rows_per_group, "val_rows": val_rows}


def _sample_quantiles(sample: np.ndarray) -> dict:
    """median, p90, p99 and max of a residual sample (a unit's, or its set's units' pooled)."""
    return {"median": float(np.median(sample)), "p90": float(np.quantile(sample, 0.9)),
            "p99": float(np.quantile(sample, 0.99)), "max_sampled": float(sample.max())}


def unit_manifest(*, fingerprint: str, key: dict, model_name: str, vocab_size: int, eos_token_id: int | None,
                  pad_token_id: int | None, source: dict, segments: int, counts: dict, shards: list[dict],
                  residual: dict, residual_sample: list[float], device: str, dtype: str | None, host: str,
                  torch_version: str, worker_stats: list[dict], fidelity: dict | None = None) -> dict:
    """A unit's manifest.json, assembled from what the teacher pass gathered (pure: reads nothing).

    key, fingerprint: the unit's `unit_key` and its hash. source: the source report (a dict).
    segments: how many segments the source was cut into. counts: {"train"|"val": {"sequences",
    "tokens"}} summed over the shards. shards: their `shard_entry` records, in order. residual: the
    shards' residual records (`teacher.residual_stats`) summed: {"sum", "n", "below_floor",
    "fp16_zero", "fp16_subnormal"}, n = 0 for an unlabelled unit (its `residual` section is then
    empty); residual_sample: the shards' samples concatenated. worker_stats: one record per worker
    process that labelled the unit ({"forward_tokens", "forward_seconds", "seconds"}).
    fidelity: `teacher.measure_fidelity`'s record, when measured (it reads the unit through this
    manifest, so it is measured on the manifest without it, which is then built again with it).
    Totals, the residual statistics and the run section are derived here."""
    total_tokens = counts["train"]["tokens"] + counts["val"]["tokens"]
    total_bytes = sum(m["bytes"] for m in shards)
    rs = np.array(residual_sample if residual_sample else [0.0])
    fwd_tokens = sum(s.get("forward_tokens", 0) for s in worker_stats)
    fwd_seconds = sum(s.get("forward_seconds", 0.0) for s in worker_stats)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "unit",
        "fingerprint": fingerprint,
        "key": key,
        "model": {"name": model_name, "vocab_size": vocab_size},
        "tokenizer": {"eos_token_id": eos_token_id, "pad_token_id": pad_token_id},
        "source": source,
        "segments": segments,
        "counts": counts,
        "totals": {"sequences": sum(m["rows"] for m in shards), "tokens": total_tokens, "bytes": total_bytes,
                   "bytes_per_token": total_bytes / max(total_tokens, 1)},
        "residual": ({"mean": residual["sum"] / max(residual["n"], 1), **_sample_quantiles(rs),
                      "positions": residual["n"],
                      "below_1e-30": residual["below_floor"], "fp16_would_be_zero": residual["fp16_zero"],
                      "fp16_would_be_subnormal": residual["fp16_subnormal"],
                      "sample": [float(v) for v in rs[np.linspace(0, len(rs) - 1, min(256, len(rs))).astype(int)]]}
                     if residual["n"] else {}),
        "shards": shards,
        "run": {"device": device, "dtype": dtype, "host": host, "torch": torch_version,
                "workers": len(worker_stats) or 1,
                # per worker process: the figure one process reaches, comparable across worker counts
                "teacher_tokens_per_s": fwd_tokens / fwd_seconds if fwd_seconds else None,
                "forward_tokens": fwd_tokens, "forward_seconds": fwd_seconds,
                "seconds": sum(s.get("seconds", 0.0) for s in worker_stats)},
    }
    if fidelity is not None:
        manifest["fidelity"] = fidelity
    return manifest


def _weighted(units: list[dict], section: str, field: str, weight: str) -> float | None:
    """The mean of units' section[field] weighted by section[weight] (None when no unit has it)."""
    pairs = [(u[section][field], u[section][weight]) for u in units if u.get(section) and field in u[section]]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def set_manifest(*, fingerprint: str, key: dict, model_name: str, model_path: str, units: list[dict],
                 unit_names: list[str], this_pass: list[dict], device: str, this_pass_seconds: float) -> dict:
    """A set's manifest.json from its units' manifests, in config order (pure: reads nothing).

    key, fingerprint: the set's `set_key` and its hash. units: the unit manifests; unit_names: their
    folder names under units/; this_pass: what this pass did to each ({"status", "labelled_tokens"}).
    Counts are keyed corpus/subset/split; totals are summed; the residual and fidelity means are
    weighted by each unit's positions (its quantiles come from the units' samples pooled)."""
    if not len(units) == len(unit_names) == len(this_pass):
        raise ValueError(f"{len(units)} unit manifests, {len(unit_names)} names, {len(this_pass)} this_pass records")
    counts, totals = {}, {"sequences": 0, "tokens": 0, "bytes": 0}
    for m in units:
        src = m["key"]["source"]
        for sp, c in m["counts"].items():
            counts[f"{src['corpus']}/{src['subset']}/{sp}"] = dict(c)
        for f in totals:
            totals[f] += m["totals"][f]
    totals["bytes_per_token"] = totals["bytes"] / max(totals["tokens"], 1)
    labelled = [m for m in units if m["residual"]]
    sample = np.array([v for m in labelled for v in m["residual"]["sample"]] or [0.0])
    residual = {"mean": _weighted(labelled, "residual", "mean", "positions") or 0.0, **_sample_quantiles(sample),
                "positions": sum(m["residual"]["positions"] for m in labelled)}
    for f in ("below_1e-30", "fp16_would_be_zero", "fp16_would_be_subnormal"):
        residual[f] = sum(m["residual"][f] for m in labelled)
    measured = [m for m in units if m.get("fidelity")]
    fidelity = {}
    if measured:
        fidelity = {"probe": measured[0]["fidelity"]["probe"],
                    "sequences": sum(m["fidelity"]["sequences"] for m in measured),
                    "positions": sum(m["fidelity"]["positions"] for m in measured),
                    "kl_quantisation_max_abs": max(m["fidelity"]["kl_quantisation_max_abs"] for m in measured)}
        for f in ("topk_ids_exact_match", "kl_quantisation_mean_abs", "kl_truncation_mean_abs", "kl_dense_mean"):
            fidelity[f] = _weighted(measured, "fidelity", f, "positions")
    fwd_tokens = sum(m["run"]["forward_tokens"] for m in units)
    fwd_seconds = sum(m["run"]["forward_seconds"] for m in units)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "set",
        "fingerprint": fingerprint,
        "key": key,
        "model": {"name": model_name, "path": model_path, "vocab_size": max(m["model"]["vocab_size"] for m in units)},
        "tokenizer": units[0]["tokenizer"],
        "units": [{"dir": f"{UNITS_DIR}/{name}", "fingerprint": m["fingerprint"], "corpus": m["key"]["source"]["corpus"],
                   "subset": m["key"]["source"]["subset"], "sequences": m["totals"]["sequences"],
                   "tokens": m["totals"]["tokens"], "bytes": m["totals"]["bytes"], "this_pass": tp}
                  for name, m, tp in zip(unit_names, units, this_pass)],
        "counts": counts,
        "totals": totals,
        "residual": residual,
        "run": {"device": device, "workers": max(m["run"]["workers"] for m in units),
                "teacher_tokens_per_s": fwd_tokens / fwd_seconds if fwd_seconds else None,
                "forward_tokens": fwd_tokens, "seconds": sum(m["run"]["seconds"] for m in units),
                "this_pass_seconds": this_pass_seconds},
    }
    if fidelity:
        manifest["fidelity"] = fidelity
    return manifest



def sets_using(root: Path) -> dict[str, list[str]]:
    """unit folder name -> the set folders (configs' caches) under `root` that list it; a set manifest
    that cannot be read is skipped (an inventory lists what it can)."""
    users: dict[str, list[str]] = {}
    for mf in sorted((root / SETS_DIR).glob(f"*/{MANIFEST}")):
        try:
            m = json.loads(mf.read_text())
            for u in m.get("units", []):
                users.setdefault(Path(u["dir"]).name, []).append(mf.parent.name)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
            continue
    return users



# --------------------------------------------------------------------------- the dataset card


def _features_yaml(k: int, vocab_size: int) -> str:
    ids = "uint16" if id_dtype(vocab_size) is np.uint16 else "uint32"
    return f"""  features:
  - name: {SEQ_ID}
    dtype: int64
  - name: {CORPUS}
    dtype: string
  - name: {SUBSET}
    dtype: string
  - name: {SPLIT}
    dtype: string
  - name: {INPUT_IDS}
    list: {ids}
  - name: {TOPK_IDS}
    list:
      list: {ids}
      length: {k}
  - name: {TOPK_PROBS}
    list:
      list: uint16
      length: {k}
  - name: {RESIDUAL}
    list: uint16
"""


def write_card(folder: Path, manifest: dict) -> None:
    """The unit's README.md: a Hugging Face dataset card, so `datasets.load_dataset(folder)` loads
    it and `hf upload` publishes it as it is."""
    key, src = manifest["key"], manifest["key"]["source"]
    k, vocab = key["top_k"], manifest["model"]["vocab_size"]
    t = manifest["totals"]
    # the card's text is part of the unit's bytes: it still names `mol/cache.py` (now the mol/cache/
    # package), so that units built before and after the package are the same files
    text = f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: "shard-*.parquet"
dataset_info:
{_features_yaml(k, vocab)}tags:
- mol
- knowledge-distillation
- teacher-labels
---
# MoL teacher labels: {src['corpus']}/{src['subset']}

Top-{k} next-token distributions of **{manifest['model']['name']}** over one packed corpus, made by
MoL's Stage 1 (`make teacher-cache`) for Mixture-of-Losses training (arXiv 2505.12043). One row is
one packed sequence; the `split` column holds MoL's own train/val split (the dataset's single split
is named `train` only because the Hub requires one).

| | |
|---|---|
| unit fingerprint | `{manifest['fingerprint']}` |
| model fingerprint | `{key['model_fingerprint']}` |
| tokenizer fingerprint | `{key['tokenizer_fingerprint']}` |
| k | {k} (+ one residual bucket) |
| labelled | {key['labelled']} |
| source sha256 | `{src['sha256']}` ({src['format']}) |
| packing | max_seq_len {key['packing']['max_seq_len']}, val_fraction {key['packing']['val_fraction']} |
| sequences / tokens | {t['sequences']} / {t['tokens']} |
| bytes per token | {t['bytes_per_token']:.1f} |
| schema version | {manifest['schema_version']} |

Columns (`mol/cache.py` is the contract): `input_ids` [L]; `teacher_topk_ids` [L-1, k] the ascending ids
as gaps g, id_j = g_0 + ... + g_j (`numpy.cumsum(g, axis=-1)`);
`teacher_topk_probs` [L-1, k] codes q, p = (q / 1023)^2; `teacher_residual` [L-1] codes u,
r = exp(-u * ln(1e30) / 65535). MoL verifies every shard's sha256 against `manifest.json` before
it uses a downloaded unit, and refuses one whose model or tokenizer fingerprint differs from the run's.
"""
    write_atomic(folder / CARD, text.encode())
