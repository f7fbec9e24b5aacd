"""Stage 1: run the frozen base model once over a config's sources and store its top-k soft labels,
one cache unit per source (units another config already built are reused, not labelled again).

The pass streams: a producer thread reads, tokenizes and packs a segment into groups of
rows_per_shard sequences, the main thread labels them (mol/labels.py, or the vLLM backend) and
builds each shard's rows and resume record (mol.cache.records), writer threads encode and write the
shards in order (mol.cache.ShardWriter). A unit's manifest is written once every segment is, then
the set's. Sharded: teacher.num_workers processes label the (unit, segment) items j % N, and
`finalize_cache` writes the manifests. `run_teacher_pass` takes the labelling backend and a `Spans`
explicitly (defaults: the config's backend, no measurement): the bench and the synthetic corpora's
instant teacher pass their own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import queue
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import cache as C
from .cache import cache_lock
from .config import MolConfig, dump_config
from .files import fsync_dir
from .corpora import CorpusError, Segment, SegmentPacker, SourceReport, check_report, source_caps, source_segments
from .heldout import check_heldout_disjoint
from .labels import check_top_k, config_vocab_size, measure_fidelity, teacher_labels
from .model import load_model, load_tokenizer, pick_device, pick_dtype, resolve_model_path
from .spans import NO_SPANS, Spans

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
MakeBar = Callable[[Optional[int], str], Progress]  # (total or None when unknown, description)
Backend = Callable[[MolConfig, Path, torch.device, int], tuple]
"""(cfg, model path, device, pad id) -> (transformers model or None, label(batch) -> [(ids, probs, residual)])."""

_BACKEND: ContextVar[Optional[Backend]] = ContextVar("mol_teacher_backend", default=None)


@contextmanager
def use_backend(backend: Backend):
    """Within the block, a pass given no backend labels through `backend` (mol.synthetic.instant_teacher)."""
    token = _BACKEND.set(backend)
    try:
        yield
    finally:
        _BACKEND.reset(token)


@contextmanager
def _input_errors():
    """An input that cannot be opened (a folder where a file belongs, no read permission) is a bad
    input like any other: a CorpusError naming the file (the CLI's exit 2), not a traceback."""
    try:
        yield
    except FileNotFoundError:
        raise  # already worded by the callers, with the source it belongs to
    except OSError as e:
        if e.filename is None:
            raise
        raise CorpusError(f"{e.filename}: cannot read ({e.strerror})") from None


def _prepare(cfg: MolConfig):
    """Resolve the cache key (file hashes only) and check k against the vocabulary, before any packing."""
    model_path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(model_path)
    # checked before hashing, packing or loading anything: the top-k must leave a residual bucket
    vocab = config_vocab_size(model_path, tokenizer)
    check_top_k(cfg.teacher.top_k, vocab)
    with _input_errors():
        rk = C.resolve_cache_key(cfg, tokenizer)
    return rk, tokenizer, vocab


def teacher_backend(cfg: MolConfig, model_path: Path, device, pad_id: int):
    """The config's backend (a `Backend`). A vLLM labeller also has `vocab_size` (rows of its output
    projection) and `close()`."""
    k, chunk = cfg.teacher.top_k, cfg.teacher.chunk_positions
    if cfg.teacher.backend == "vllm":
        from .vllm_teacher import VllmTeacher

        return None, VllmTeacher(model_path, k, chunk, device=device, dtype=cfg.model.dtype,
                                 max_model_len=cfg.data.max_seq_len, engine_kwargs=cfg.teacher.vllm_kwargs)
    model = load_model(model_path, cfg.model, device=device).eval()
    return model, lambda batch: teacher_labels(model, batch, k, chunk, pad_id, device)


@dataclass
class _Group:
    """rows_per_shard packed sequences and the packer's state right after the last of them."""

    seqs: list
    state: dict
    end: bool  # the segment's last group


def _produce(packer: SegmentPacker, rows: int, out: queue.Queue, stop: threading.Event, spans: Spans) -> None:
    """Producer thread: read, tokenize and pack one segment into groups of `rows` sequences.
    The last group (possibly empty) carries the final state (done = True)."""
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pull():
        with spans.span("packer: read + render + tokenize + pack (_fill)"):
            return next(it, None)

    def state() -> dict:
        with spans.span("packer state (resume record)"):
            return packer.state()

    try:
        it = iter(packer)
        group, nxt = [], pull()
        while nxt is not None:
            group.append(nxt)
            st = state() if len(group) == rows else None
            nxt = pull()
            if st is not None and nxt is not None:
                if not put(_Group(group, st, False)):
                    return
                group = []
        put(_Group(group, state(), True))
    except BaseException as e:  # handed to the consumer, which raises it
        put(e)


@dataclass
class _Labeller:
    """The teacher, loaded on first use: a pass whose units are all reused loads no model."""

    cfg: MolConfig
    model_path: Path
    device: torch.device
    pad_id: int
    vocab: int
    k: int
    backend: Backend
    model: object = None
    label: object = None
    seconds: float = 0.0
    tokens: int = 0

    def probe_model(self, any_backend: bool):
        """The teacher as a transformers model, for the fidelity probe: the labelling model when it
        is one, else loaded once (a sharded vLLM pass's finalize: any_backend) or None."""
        if self.model is None and (any_backend or self.cfg.teacher.backend == "transformers"):
            self.model = load_model(self.model_path, self.cfg.model, device=self.device).eval()
            self.vocab = max(self.vocab, self.model.get_output_embeddings().weight.shape[0])
        return self.model

    @property
    def dtype(self) -> str:
        """The labelling model's compute dtype, for the manifest."""
        if self.cfg.teacher.backend == "vllm":
            from .vllm_teacher import engine_dtype

            return str(getattr(torch, engine_dtype(self.cfg.model.dtype, self.device.type == "cuda")))
        return str(pick_dtype(self.cfg.model.dtype, self.device))

    @property
    def defers_finalize(self) -> bool:
        """vLLM: every unit is labelled first, then the engine is shut down and a transformers model
        measures each unit's fidelity (the engine holds the device's memory; vLLM and an independent
        forward pass are never resident together)."""
        return self.cfg.teacher.backend == "vllm"

    def close(self) -> None:
        close = getattr(self.label, "close", None)
        if close is not None:
            close()
        self.label = None

    def __call__(self, batch: list[np.ndarray]):
        if self.label is None:
            self.model, self.label = self.backend(self.cfg, self.model_path, self.device, self.pad_id)
            if self.model is not None:
                self.vocab = max(self.vocab, self.model.get_output_embeddings().weight.shape[0])
            self.vocab = max(self.vocab, getattr(self.label, "vocab_size", 0))
            check_top_k(self.k, self.vocab)
        t0 = time.time()
        out = self.label(batch)
        self.seconds += time.time() - t0
        self.tokens += sum(len(s) for s in batch)
        return out


@dataclass
class _Pass:
    """One Stage 1 process: the config resolved, its tokenizer, the (lazy) teacher, and how it is
    watched (the progress bar, the spans)."""

    cfg: MolConfig
    rk: C.ResolvedSet
    tokenizer: object
    labeller: _Labeller
    device: torch.device
    spans: Spans = NO_SPANS
    bar: Progress = lambda n: None
    # shared locks on every unit the set will name, from the moment the unit is complete (or
    # labelled) until the set manifest is written: a gc removes none of them under this pass
    held: C.ReadLocks = dataclasses.field(default_factory=C.ReadLocks)

    def writer(self) -> C.ShardWriter:
        t = self.cfg.teacher
        return C.ShardWriter(self.rk.k, self.labeller.vocab, t.zstd_level, t.writer_threads,
                             C.row_group_rows(self.cfg), self.spans)

    def unit_stats(self, worker: int, workers: int, secs0: float, toks0: int, t0: float) -> dict:
        """What this process did for one unit since (secs0, toks0, t0): a worker record of the manifest."""
        return {"worker": worker, "workers": workers, "forward_tokens": self.labeller.tokens - toks0,
                "forward_seconds": self.labeller.seconds - secs0, "seconds": time.time() - t0,
                "device": str(self.device), "host": platform.node()}


def _start(cfg: MolConfig, backend: Optional[Backend], spans: Spans, bar: Progress = lambda n: None) -> _Pass:
    device = pick_device(cfg.model.device)
    with spans.span("prepare (tokenizer, fingerprints)"):
        rk, tokenizer, vocab = _prepare(cfg)
    labeller = _Labeller(cfg, rk.model_path, device, tokenizer.pad_token_id, vocab, rk.k,
                         backend or _BACKEND.get() or teacher_backend)
    return _Pass(cfg, rk, tokenizer, labeller, device, spans, bar)


def _shard_data(p: _Pass, group: _Group, unit: C.ResolvedUnit, segment: int, part: int, labels) -> C.ShardData:
    seqs = group.seqs
    splits = [s.split for s in seqs]
    record = C.resume_record(unit=unit.fingerprint, segment=segment, part=part, splits=splits,
                             lengths=[len(s.input_ids) for s in seqs], end=group.end, state=group.state)
    first = segment * C.SEGMENT_STRIDE + part * unit.key["rows_per_shard"]
    return C.shard_data(seq_id=first + np.arange(len(seqs), dtype=np.int64), corpus=unit.source.corpus,
                        subset=unit.source.subset, splits=splits, rows=[s.input_ids for s in seqs], labels=labels,
                        k=p.rk.k, vocab_size=p.labeller.vocab, record=record, spans=p.spans)


def _label_group(p: _Pass, unit: C.ResolvedUnit, g: _Group) -> list | None:
    """The group's labels, a batch at a time (None for an unlabelled unit)."""
    if not unit.labelled:
        return None
    labels, bs = [], p.cfg.teacher.batch_size
    for b in range(0, len(g.seqs), bs):
        labels += p.labeller([s.input_ids for s in g.seqs[b:b + bs]])
    return labels


def _label_segment(p: _Pass, unit: C.ResolvedUnit, segment: Segment) -> tuple[int, bool]:
    """Label one segment from its first missing shard. Returns (tokens labelled, resumed?)."""
    cfg = p.cfg
    for f in unit.dir.glob(f"shard-{segment.index:05d}-*.parquet.tmp*"):  # a killed writer's leftovers
        f.unlink(missing_ok=True)
    part, last = C.segment_progress(unit.dir, unit.fingerprint, unit.key["rows_per_shard"], segment.index)
    if last is not None and last.get("end"):
        return 0, True  # written by an earlier pass that stopped before the unit's manifest
    packer = SegmentPacker(unit.source, cfg.data, p.spans.tokenizer(p.tokenizer), cfg.model.chat_template_kwargs,
                           segment, source_caps(unit.source, cfg.data), None if last is None else last["state"])
    groups: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    producer = threading.Thread(target=_produce, args=(packer, cfg.teacher.rows_per_shard, groups, stop, p.spans),
                                name="mol-packer", daemon=True)
    producer.start()
    writer = p.writer()
    labelled = 0
    try:
        while True:
            with p.spans.span("main: waiting for packed groups (queue get)"):
                g = groups.get()
            if isinstance(g, BaseException):
                raise g
            labels = _label_group(p, unit, g)
            tokens = sum(len(s.input_ids) for s in g.seqs)
            labelled += tokens if labels is not None else 0
            with p.spans.span("main: shard data (_shard_data: encode + resume record)"):
                data = _shard_data(p, g, unit, segment.index, part, labels)
            writer.submit(unit.dir / C.shard_name(segment.index, part), data)
            p.bar(tokens)
            part += 1
            if g.end:
                break
        writer.close()
    finally:
        stop.set()
        writer.close_quietly()
        producer.join()
    return labelled, last is not None


def _plan(cfg: MolConfig, rk: C.ResolvedSet) -> list[tuple[int, Segment]]:
    """Every (unit index, segment) of the config, in order: item j belongs to worker j % N."""
    items = []
    for i, u in enumerate(rk.units):
        with _input_errors():
            items += [(i, s) for s in source_segments(u.source, cfg.data)]
    return items


def _unit_items(plan: list[tuple[int, Segment]], i: int) -> tuple[list[Segment], int]:
    """Unit i's segments, and the plan index of its first (which worker owns which follows)."""
    return [s for j, s in plan if j == i], next(n for n, (j, _) in enumerate(plan) if j == i)


def _reuse_unit(u: C.ResolvedUnit) -> C.CacheUnit:
    """A complete unit (built here or copied from elsewhere) is used only once its checks pass."""
    unit = C.CacheUnit(u.dir, u.fingerprint)
    problems = C.key_problems(unit.key, u.key, "this run's")
    if problems:
        raise C.CacheError(f"unit {u.dir}: {'; '.join(problems)}; it was built by another model or tokenizer: remove it")
    # checksums and footers, not every value: reusing a unit must not cost a decode of all of it, and
    # the reader checks each row group's values before they reach a step
    problems = unit.verify(contents=False)
    if problems:
        raise C.CacheError(f"unit {u.dir} failed verification; remove it to rebuild it:\n  " + "\n  ".join(problems))
    return unit


def _label_unit(p: _Pass, i: int, segments: list[Segment], outcome: dict, deferred: list) -> None:
    """Label this process's segments of unit i (under the unit's lock); then write its manifest, or
    leave it to the finalize step (a sharded worker: its record) or to the end of the pass (vLLM)."""
    cfg, u = p.cfg, p.rk.units[i]
    me, n_workers = cfg.teacher.worker_index, cfg.teacher.num_workers
    sharded = n_workers > 1
    with cache_lock(u.dir, me if sharded else None, shared=sharded, what="unit"):
        p.held.add(u.dir)  # kept until the set manifest names it
        if (u.dir / C.MANIFEST).is_file():  # finished by another config's pass meanwhile
            return
        resumed, secs0, toks0, u0 = False, p.labeller.seconds, p.labeller.tokens, time.time()
        for seg in segments:
            with _input_errors():
                n, r = _label_segment(p, u, seg)
            outcome[i]["labelled_tokens"] += n
            resumed |= r
        outcome[i]["status"] = "resumed" if resumed else "built"
        stats = p.unit_stats(me, n_workers, secs0, toks0, u0)
        if sharded:
            C.write_atomic(u.dir / f"worker-{me:04d}.json", (json.dumps(stats) + "\n").encode())
        elif p.labeller.defers_finalize:
            deferred.append((u, stats))
        else:
            with p.spans.span("finalize unit (checksums, card, manifest)"):
                _finalize_unit(p, u, [stats])


def run_teacher_pass(cfg: MolConfig, make_bar: Optional[MakeBar] = None, *, backend: Optional[Backend] = None,
                     spans: Spans = NO_SPANS) -> tuple[Path, str]:
    """Build (or resume, or reuse) every cache unit of `cfg`, then its set manifest. Returns
    (set folder, status) with status in {"built", "resumed", "reused", "up-to-date", "worker-done"}:
    "reused" when every unit already existed (nothing labelled).

    With teacher.num_workers = N > 1 this process labels only the (unit, segment) items j with
    j % N == teacher.worker_index and returns "worker-done"; `finalize_cache` checks that every
    segment is complete and writes the manifests. Segments and shards do not depend on N.
    `backend`: the labeller (default the config's, `teacher_backend`); `spans`: where the pass's
    time is reported (mol.bench.stage1).
    """
    make_bar = make_bar or (lambda total, desc: (lambda n: None))
    t0 = time.time()
    p = _start(cfg, backend, spans)
    if _set_complete(p.rk):
        log.info("cache %s is complete for this config: nothing to do", p.rk.cache_dir)
        return p.rk.cache_dir, "up-to-date"
    with spans.span("held-out text against training text"), _input_errors():
        check_heldout_disjoint(cfg, p.tokenizer)  # before anything is labelled or written
    with p.held:
        return _run_pass(p, make_bar, t0)


def _set_complete(rk: C.ResolvedSet) -> bool:
    """The set manifest exists and so does every unit it names. A set whose unit is gone (removed by
    hand or by a gc) is not complete: the pass builds the unit again, then the set manifest."""
    if not (rk.cache_dir / C.MANIFEST).is_file():
        return False
    gone = _gone_units(rk)
    if gone:
        log.warning("cache %s names %d unit(s) that are gone or incomplete (%s): building them again",
                    rk.cache_dir, len(gone), ", ".join(gone))
    return not gone


def _gone_units(rk: C.ResolvedSet) -> list[str]:
    return [u.name for u in rk.units if not (u.dir / C.MANIFEST).is_file()]


def _withdraw_set(rk: C.ResolvedSet) -> None:
    """Under the set's lock: a set manifest over a unit that is gone promises what is not there;
    it is removed (durably) before the unit is rebuilt, and written again, last, once it is."""
    if (rk.cache_dir / C.MANIFEST).is_file() and _gone_units(rk):
        (rk.cache_dir / C.MANIFEST).unlink(missing_ok=True)
        fsync_dir(rk.cache_dir)


def _hold_complete_units(p: _Pass) -> dict[int, bool]:
    """{unit index: complete?}, each complete unit locked for reading first (`p.held`), so that what
    is found complete here stays so until the set manifest names it."""
    return {i: p.held.add(u.dir) and (u.dir / C.MANIFEST).is_file() for i, u in enumerate(p.rk.units)}


def _run_pass(p: _Pass, make_bar: MakeBar, t0: float) -> tuple[Path, str]:
    """`run_teacher_pass` once the set is known incomplete, with `p.held` open (closed by the caller
    after the set manifest is written)."""
    cfg, rk, spans = p.cfg, p.rk, p.spans
    n_workers, me = cfg.teacher.num_workers, cfg.teacher.worker_index
    sharded = n_workers > 1
    done = _hold_complete_units(p)
    items = [(i, s) for j, (i, s) in enumerate(_plan(cfg, rk)) if j % n_workers == me and not done[i]]
    outcome = {i: {"status": "reused", "labelled_tokens": 0} for i in range(len(rk.units))}
    for i in range(len(rk.units)):
        if done[i]:
            _reuse_unit(rk.units[i])
            log.info("unit %s (%s/%s): reused", rk.units[i].name, rk.units[i].source.corpus, rk.units[i].source.subset)
    # streaming: the token total is unknown until the end, so the bar counts tokens and their rate
    p.bar = make_bar(None, "teacher pass" if not sharded else f"teacher pass, worker {me}/{n_workers}")
    deferred: list[tuple[C.ResolvedUnit, dict]] = []
    with cache_lock(rk.cache_dir, me if sharded else None, shared=sharded):
        _withdraw_set(rk)
        try:
            if me == 0:
                dump_config(cfg, rk.cache_dir / "config.yaml")
            for i, u in enumerate(rk.units):
                mine = [s for j, s in items if j == i]
                if mine:
                    _label_unit(p, i, mine, outcome, deferred)
                    log.info("unit %s (%s/%s): %s, %d tokens labelled", u.name, u.source.corpus, u.source.subset,
                             outcome[i]["status"], outcome[i]["labelled_tokens"])
        finally:
            # on every way out, workers and failures included: a vLLM engine frees its memory before the
            # deferred finalize loads a transformers model, and never outlives the pass in a caller's process
            p.labeller.close()
        if sharded:
            log.info("worker %d of %d done; when every worker is, run the finalize step "
                     "(python -m stages.teacher_cache CONFIG teacher.num_workers=%d --finalize)", me, n_workers, n_workers)
            return rk.cache_dir, "worker-done"
        for u, stats in deferred:
            with cache_lock(u.dir, what="unit"):
                if not (u.dir / C.MANIFEST).is_file():  # another config's pass may have finalized it meanwhile
                    with spans.span("finalize unit (checksums, card, manifest)"):
                        _finalize_unit(p, u, [stats], finalizing=True)
        with spans.span("set manifest"):
            _write_set(p, outcome, t0)
    statuses = {o["status"] for o in outcome.values()}
    status = "resumed" if "resumed" in statuses else "built" if "built" in statuses else "reused"
    return rk.cache_dir, status


def _unit_shards(u: C.ResolvedUnit, segments: list[Segment], n_workers: int, first_item: int) -> list[tuple[int, int, dict]]:
    """(segment, part, resume record) of every shard of a unit whose segments are all complete;
    a CacheError names each incomplete segment and the worker that owns it."""
    out, missing = [], []
    for j, seg in enumerate(segments):
        # the records the prefix check already read: no shard's footer is read twice
        records = C.segment_prefix(u.dir, u.fingerprint, u.key["rows_per_shard"], seg.index)
        if not records or not records[-1].get("end"):
            missing.append(f"{C.UNITS_DIR}/{u.name} segment {seg.index}: {len(records)} part(s) written, not finished "
                           f"(worker {(first_item + j) % n_workers})")
            continue
        out += [(seg.index, part, rec) for part, rec in enumerate(records)]
    if missing:
        raise C.CacheError(f"{len(missing)} segment(s) unfinished with teacher.num_workers = {n_workers}: "
                           + "; ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
                           + "; run those workers (they resume)")
    return out


def _gather(cfg: MolConfig, u: C.ResolvedUnit, shards: list[tuple[int, int, dict]]) -> dict:
    """A unit's facts for its manifest from its shards' resume records: counts, the residual
    statistics and sample, the shard entries (with each file's size and sha256), the source report."""
    report = None
    counts = {sp: {"sequences": 0, "tokens": 0} for sp in ("train", "val")}
    resid = {"sum": 0.0, "n": 0, "below_floor": 0, "fp16_zero": 0, "fp16_subnormal": 0}
    sample, meta = [], []
    for seg, part, rec in shards:
        path = u.dir / C.shard_name(seg, part)
        for sp, (rows, toks) in rec["counts"].items():
            counts[sp]["sequences"] += rows
            counts[sp]["tokens"] += toks
        if "residual" in rec:
            for f in resid:
                resid[f] += rec["residual"][f]
            sample += rec["residual"]["sample"]
        if rec["end"]:
            seg_report = SourceReport(**rec["state"]["report"])
            report = seg_report if report is None else report.merge(seg_report)
        meta.append(C.shard_entry(file=path.name, segment=seg, part=part, rows=rec["rows"],
                                  tokens=sum(c[1] for c in rec["counts"].values()), bytes=path.stat().st_size,
                                  sha256=C.sha256_path(path), rows_per_group=C.row_group_rows(cfg),
                                  val_rows=rec["val_rows"]))
    report.sha256 = u.key["source"]["sha256"]
    check_report(report, u.source)
    return dict(counts=counts, shards=meta, residual=resid, residual_sample=sample, source=dataclasses.asdict(report))


def _finalize_unit(p: _Pass, u: C.ResolvedUnit, stats: list[dict], segments: list[Segment] | None = None,
                   n_workers: int = 1, first_item: int = 0, finalizing: bool = False) -> None:
    """Every segment of the unit is written: checksum, gather statistics, measure fidelity, write
    the dataset card, then the manifest last. `finalizing`: the finalize step of a sharded pass,
    which measures fidelity with a transformers model whatever the backend."""
    cfg, labeller = p.cfg, p.labeller
    if segments is None:
        segments = source_segments(u.source, cfg.data)
    shards = _unit_shards(u, segments, n_workers, first_item)
    listed = {C.shard_name(seg, part) for seg, part, _ in shards}
    stray = sorted(f.name for f in u.dir.glob(C.SHARD_GLOB) if f.name not in listed)
    if stray:  # verify would refuse the unit for it on every later use: refuse it now, naming it
        raise C.CacheError(f"{u.dir / stray[0]}: a shard file that is no part of this unit's segments "
                           + (f"(and {len(stray) - 1} more: {', '.join(stray[1:6])}) " if len(stray) > 1 else "")
                           + "(left from another pass, or copied here); no manifest written: remove it and run again")
    gathered = _gather(cfg, u, shards)
    measure = bool(cfg.teacher.fidelity_sequences and u.labelled and gathered["counts"]["train"]["sequences"])
    probe = labeller.probe_model(any_backend=finalizing) if measure else None
    facts = dict(fingerprint=u.fingerprint, key=u.key, model_name=cfg.model.name, vocab_size=labeller.vocab,
                 eos_token_id=p.tokenizer.eos_token_id, pad_token_id=p.tokenizer.pad_token_id,
                 segments=len(segments), **gathered, device=str(p.device), dtype=labeller.dtype,
                 host=platform.node(), torch_version=torch.__version__, worker_stats=stats)
    manifest = C.unit_manifest(**facts)
    # fidelity reads the shards; the manifest is written only after it, so "manifest exists" == complete
    if measure and probe is None:
        log.info("fidelity not measured: the %s backend holds no transformers model (the finalize step of a "
                 "sharded pass measures it with one)", cfg.teacher.backend)
    elif measure:
        fidelity = measure_fidelity(probe, C.CacheUnit.from_manifest(u.dir, manifest, hashed=True),
                                    cfg.teacher.fidelity_sequences, cfg.teacher.chunk_positions, p.device)
        manifest = C.unit_manifest(**facts, fidelity=fidelity)
    C.write_card(u.dir, manifest)
    C.write_manifest(u.dir, manifest)
    for f in u.dir.glob("worker-*.json"):
        f.unlink(missing_ok=True)
    log.info("unit %s complete: %d sequences, %d tokens, %.1f bytes/token", u.name,
             manifest["totals"]["sequences"], manifest["totals"]["tokens"], manifest["totals"]["bytes_per_token"])


def _write_set(p: _Pass, outcome: dict, t0: float) -> None:
    """Every unit is complete: write the set manifest that names them (last)."""
    rk = p.rk
    units = [C.CacheUnit(u.dir, u.fingerprint).manifest for u in rk.units]
    if not any(m["counts"]["train"]["sequences"] for m in units):
        raise CorpusError("the corpora gave no training sequences")
    manifest = C.set_manifest(fingerprint=rk.fingerprint, key=rk.key, model_name=p.cfg.model.name,
                              model_path=str(rk.model_path), units=units, unit_names=[u.name for u in rk.units],
                              this_pass=[outcome[i] for i in range(len(rk.units))], device=str(p.device),
                              this_pass_seconds=time.time() - t0)
    C.write_manifest(rk.cache_dir, manifest)
    totals = manifest["totals"]
    log.info("cache %s complete: %d units, %d sequences, %d tokens, %.1f bytes/token", rk.cache_dir, len(units),
             totals["sequences"], totals["tokens"], totals["bytes_per_token"])


def finalize_cache(cfg: MolConfig, *, spans: Spans = NO_SPANS) -> tuple[Path, str]:
    """After sharded workers: check every segment of every unit is complete, then write each unit's
    manifest (checksums, fidelity) and the set manifest, last. Returns (set folder, "finalized" |
    "up-to-date"); a CacheError names each unfinished segment and the worker that owns it."""
    t0 = time.time()
    p = _start(cfg, None, spans)
    rk = p.rk
    if _set_complete(rk):
        return rk.cache_dir, "up-to-date"
    n_workers = cfg.teacher.num_workers
    plan = _plan(cfg, rk)
    with p.held, cache_lock(rk.cache_dir):
        _withdraw_set(rk)
        done = _hold_complete_units(p)
        pending = [u for i, u in enumerate(rk.units) if not done[i]]
        problems = []
        for u in pending:  # every unit checked before any manifest is written
            segs, first = _unit_items(plan, rk.units.index(u))
            try:
                _unit_shards(u, segs, n_workers, first)
            except C.CacheError as e:
                problems.append(str(e))
        if problems:
            raise C.CacheError(f"{rk.cache_dir}: not every segment is written:\n  " + "\n  ".join(problems))
        outcome = {}
        for i, u in enumerate(rk.units):
            outcome[i] = {"status": "reused" if u not in pending else "built", "labelled_tokens": 0}
            if u not in pending:
                _reuse_unit(u)
                continue
            with cache_lock(u.dir, what="unit"):
                p.held.add(u.dir)  # kept until the set manifest names it
                for f in u.dir.glob(C.MANIFEST + ".tmp*"):  # a killed finalize's
                    f.unlink(missing_ok=True)
                stats = [json.loads(f.read_text()) for f in sorted(u.dir.glob("worker-*.json"))]
                outcome[i]["labelled_tokens"] = sum(s["forward_tokens"] for s in stats)
                segs, first = _unit_items(plan, i)
                with spans.span("finalize unit (checksums, card, manifest)"):
                    _finalize_unit(p, u, stats, segs, n_workers, first, finalizing=True)
        with spans.span("set manifest"):
            _write_set(p, outcome, t0)
    return rk.cache_dir, "finalized"
