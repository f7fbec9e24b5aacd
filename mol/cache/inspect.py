"""What `python -m stages.cache_info` shows and does: a set's or a unit's summary from its manifest,
an inventory of a cache root's units and the sets that use them, verification, and the removal of
units and sets no config uses (`garbage_collect`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..config import expand_path, load_config
from ..files import fsync_dir, holders_text, try_lock
from .keys import resolve_cache_key
from .locks import READ_LOCK
from .manifest import sets_using
from .read import CacheUnit, TeacherCache
from .schema import SETS_DIR, UNITS_DIR, CacheError


def describe(cache: TeacherCache) -> str:
    m = cache.manifest
    t, r, key = cache.totals, m["residual"], cache.key
    lines = [
        f"cache        {cache.path}",
        f"model        {m['model']['name']}  (fingerprint {key['model_fingerprint'][:12]}, vocab {cache.vocab_size})",
        f"k            {cache.k}   label_domain={cache.label_domain}   max_seq_len={key['packing']['max_seq_len']}",
        f"sequences    {t['sequences']}   tokens {t['tokens']}   units {len(cache.units)}   shards {cache.shard_count}",
        f"bytes        {t['bytes']}   ({t['bytes_per_token']:.1f} bytes/token)",
    ]
    if r.get("positions"):
        lines.append(f"residual r0  mean {r['mean']:.4f}  median {r['median']:.4f}  p90 {r['p90']:.4f}  p99 {r['p99']:.4f}"
                     f"  (below 1e-30: {r.get('below_1e-30', 0)} of {r['positions']}; fp16 would store "
                     f"{r.get('fp16_would_be_zero', 0)} zeros, {r.get('fp16_would_be_subnormal', 0)} subnormals)")
    if m.get("run", {}).get("teacher_tokens_per_s"):
        lines.append(f"teacher      {m['run']['teacher_tokens_per_s']:.0f} tokens/s on {m['run']['device']}")
    f = m.get("fidelity") or {}
    if f:
        lines.append(f"fidelity     mean |KL_cached - KL_exact| = {f['kl_quantisation_mean_abs']:.2e} nats/token "
                     f"(max {f['kl_quantisation_max_abs']:.1e}); vs dense full-vocab KL {f['kl_truncation_mean_abs']:.2e} "
                     f"(dense KL {f['kl_dense_mean']:.3f}); {f['positions']} positions, probe: {f['probe']}")
    lines.append("counts       " + "  ".join(f"{k}={v['sequences']}" for k, v in sorted(m["counts"].items())))
    for u in m["units"]:
        p = u.get("this_pass") or {}
        lines.append(f"unit         {u['dir']}  {u['corpus']}/{u['subset']}  {u['tokens']} tokens  "
                     f"{u['bytes'] / max(u['tokens'], 1):.1f} B/token" + (f"  [{p['status']}, {p['labelled_tokens']} tokens labelled]"
                                                                        if p else ""))
    return "\n".join(lines)


def describe_unit(unit: CacheUnit) -> str:
    m = unit.manifest
    t, src = unit.totals, unit.source
    return "\n".join([
        f"unit         {unit.path}",
        f"source       {src['corpus']}/{src['subset']}  {m['source']['path']}  sha256 {src['sha256'][:12]}",
        f"model        {m['model']['name']}  (fingerprint {unit.key['model_fingerprint'][:12]})  k {unit.k}"
        f"  labelled={unit.labelled}",
        f"sequences    {t['sequences']}   tokens {t['tokens']}   shards {unit.shard_count}   segments {m.get('segments')}",
        f"bytes        {t['bytes']}   ({t['bytes_per_token']:.1f} bytes/token)",
    ])


def inventory(root: Path) -> str:
    users = sets_using(root)
    rows = [f"{'unit':58} {'source':28} {'tokens':>12} {'bytes':>14} {'B/token':>8}  used by"]
    for d in sorted((root / UNITS_DIR).glob("*")):
        if not d.is_dir():
            continue
        try:
            unit = CacheUnit(d)
            src = f"{unit.corpus}/{unit.subset}"
            t = unit.totals
            rows.append(f"{d.name:58} {src:28} {t['tokens']:>12} {t['bytes']:>14} {t['bytes_per_token']:>8.1f}  "
                        + (", ".join(users.get(d.name, [])) or "-"))
        except CacheError:
            size = sum(p.stat().st_size for p in d.glob("*") if p.is_file())
            rows.append(f"{d.name:58} {'(incomplete)':28} {'?':>12} {size:>14} {'':>8}  " + (", ".join(users.get(d.name, [])) or "-"))
    return "\n".join(rows)


_LOCKS = ((".lock", "a teacher pass is writing it"),
          (READ_LOCK, "in use by a trainer, an evaluation or a teacher pass reading it"))


def _take(folder: Path, link: bool = False) -> tuple[list[int], str | None]:
    """gc's exclusive hold on a folder: the lock every teacher pass, worker and finalize takes, then
    the one every reader shares (mol.cache.locks). (descriptors, None), or ([], who holds which lock,
    with its pid where the system tells it). Kept until the folder is gone, so a pass or a reader
    starting meanwhile is refused instead of using a folder being deleted. `link`: the folder is a
    symlink; a lock that cannot be made through it (a dangling link, a read-only target) is skipped,
    as no reader could have taken it either."""
    fds = []
    for name, who in _LOCKS:
        try:
            fds.append(try_lock(folder / name))
        except BlockingIOError:
            for fd in fds:
                os.close(fd)
            return [], f"{who}: {holders_text(folder / name)}"
        except OSError:
            if not link:
                raise
    return fds, None


def _size(d: Path) -> int:
    """Bytes a removal frees: nothing for a link (its target is kept)."""
    return 0 if d.is_symlink() else sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _remove(d: Path) -> None:
    """A link is unlinked, never followed: its target (a unit kept elsewhere) stays. A folder is
    renamed first, under the locks: rmtree unlinks .lock before the folder is gone, and a pass
    starting then would lock a new .lock inside it. After the rename a pass starts a fresh folder; a
    gc killed mid-delete leaves a .gc-* folder (the next gc removes it), never a half unit under its
    own name."""
    if d.is_symlink():
        d.unlink(missing_ok=True)
        fsync_dir(d.parent)
        return
    doomed = d if d.name.startswith(".gc-") else d.with_name(f".gc-{d.name}-{os.getpid()}")
    os.rename(d, doomed)
    shutil.rmtree(doomed)


def garbage_collect(configs: list[str], yes: bool, say=print) -> int:
    """Remove (`yes`; else list) every unit and set folder under these configs' cache roots that none
    of them uses, each under its locks (a folder a teacher pass writes or a reader reads is skipped,
    naming who holds it), and what an interrupted gc left (.gc-* folders and links); `say` gets one
    line a folder and the total."""
    cfgs = [load_config(c) for c in configs]
    roots = {expand_path(c.teacher.cache_root) for c in cfgs}
    keep = set()
    for c in cfgs:
        rk = resolve_cache_key(c)
        keep |= {u.dir.name for u in rk.units} | {rk.cache_dir.name}
    freed = 0
    for root in sorted(roots):
        for kind in (UNITS_DIR, SETS_DIR):
            for d in sorted((root / kind).glob("*")):
                link = d.is_symlink()
                if d.name in keep or not (link or d.is_dir()):
                    continue
                # an interrupted gc's renamed link: no reader opens a .gc-* name, no lock to take
                fds, held = ([], None) if link and d.name.startswith(".gc-") else _take(d, link)
                if held:
                    say(f"skip   {d} ({held})")
                    continue
                try:
                    size = _size(d)
                    freed += size
                    what = f"a link to {os.readlink(d)}: the link only, its target is kept" if link else f"{size / 1e6:.1f} MB"
                    say(f"{'remove' if yes else 'would remove'} {d}  ({what})")
                    if yes:
                        _remove(d)
                finally:
                    for fd in fds:
                        os.close(fd)
    say(f"{'freed' if yes else 'would free'} {freed / 1e6:.1f} MB" + ("" if yes else "; run again with --yes to remove"))
    return 0


def open_folder(path: Path) -> CacheUnit | TeacherCache:
    """A unit folder (under units/) or a set folder, opened through its manifest."""
    return CacheUnit(path) if path.parent.name == UNITS_DIR else TeacherCache(path)


def summary(cache: CacheUnit | TeacherCache) -> str:
    """`describe` a set, `describe_unit` a unit."""
    return describe_unit(cache) if isinstance(cache, CacheUnit) else describe(cache)


def verify_report(cache: CacheUnit | TeacherCache, progress=None) -> tuple[bool, str]:
    """(ok, the line or lines to print) of verifying every shard of a set or a unit."""
    problems = cache.verify(progress=progress)
    if problems:
        return False, "VERIFY FAILED:\n  " + "\n  ".join(problems)
    return True, f"verify       ok: {cache.shard_count} shards match their sha256, schema and row counts"
