"""Training curves from a run's metrics.jsonl, as PNGs in run_dir/plots/.

    ce.png         train CE per corpus (thin) and validation CE per subset (markers), cf. the paper's Fig. 2
    grad_norm.png  gradient norm per optimizer step (Fig. 3), with the clipping threshold
    kl.png         train KL per corpus and validation KL-to-base
    lr.png         learning-rate schedule

Figures are built with matplotlib's object API (Figure + savefig, which renders through Agg), never
pyplot, so importing this module changes no global backend and works without a display.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from .config import CORPORA
from .errors import MissingInput, MolError
from .files import write_atomic
from .run_folder import METRICS, PLOTS_DIR, RunFolder, read_config, read_metrics, train_val

log = logging.getLogger(__name__)


class PlotError(MolError, ValueError):
    """Metrics that cannot be plotted (no records, an unknown key)."""


CORPUS_COLOURS = {"domain": "tab:red", "general": "tab:blue"}
# each corpus' validation subsets take shades of its train colour, so families read at a glance
CORPUS_MAPS = {"domain": "Reds", "general": "Blues"}


def _rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows) of a run, read by the run folder's one reader (a line a running trainer
    is still writing is skipped with a warning rather than failing the whole plot)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise MissingInput(f"{path} does not exist: no metrics to plot")
    train, val = train_val(read_metrics(run_dir))
    if not train and not val:
        raise PlotError(f"{path}: no train or val records")
    return train, val


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry a finite `key`."""
    pts = [(r["step"], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _run_info(run_dir: Path) -> tuple[dict[str, str], float | None]:
    """({subset: corpus}, grad_clip) from the run's config, or empty when it cannot be read."""
    try:
        cfg = read_config(run_dir)
    except Exception as e:  # plots must still come out for a run with an odd or missing config
        log.debug("no usable config in %s (%s); plotting without subset families", run_dir, e)
        return {}, None
    return {s.subset: s.corpus for s in cfg.data.sources}, cfg.train.grad_clip or None


def _val_subsets(val: list[dict], prefix: str) -> list[str]:
    """Names after `prefix` in val rows, excluding the corpus aggregates, in first-seen order."""
    names: dict[str, None] = {}
    for r in val:
        for key in r:
            if key.startswith(prefix) and key[len(prefix):] not in CORPORA:
                names[key[len(prefix):]] = None
    return list(names)


def _subset_colours(subsets: list[str], corpus_of: dict[str, str]) -> dict[str, object]:
    by_corpus: dict[str, list[str]] = {}
    for s in subsets:
        by_corpus.setdefault(corpus_of.get(s, ""), []).append(s)
    out: dict[str, object] = {}
    for corpus, names in by_corpus.items():
        if corpus in CORPUS_MAPS:
            cmap = colormaps[CORPUS_MAPS[corpus]]
            for i, s in enumerate(names):
                out[s] = cmap(0.95 - 0.5 * i / max(len(names) - 1, 1))
        else:
            # family unknown (no readable config): distinct colours, skipping the train lines' red and blue
            spare = [c for i, c in enumerate(colormaps["tab10"].colors) if i not in (0, 3)]
            for i, s in enumerate(names):
                out[s] = spare[i % len(spare)]
    return out


def _new_axes(title: str, ylabel: str):
    fig = Figure(figsize=(8, 4.8), dpi=120)
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _png(fig, ax) -> bytes:
    """The finished figure as PNG bytes (written whole by the caller: a reader never sees half a PNG)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _train_lines(ax, train: list[dict], key: str, label: str) -> None:
    """The training values of `key/<corpus>`, one thin line a corpus in its colour."""
    for c in CORPORA:
        x, y = series(train, f"{key}/{c}")
        if x:
            ax.plot(x, y, lw=0.8, alpha=0.7, color=CORPUS_COLOURS[c], label=f"{label} {c}")


def plot_ce(train: list[dict], val: list[dict], corpus_of: dict[str, str], title: str) -> bytes:
    fig, ax = _new_axes(f"{title}: cross-entropy", "CE (nats/token)")
    _train_lines(ax, train, "ce", "train CE")
    subsets = _val_subsets(val, "ce/")
    colours = _subset_colours(subsets, corpus_of)
    for s in subsets:
        x, y = series(val, f"ce/{s}")
        tag = f" ({corpus_of[s]})" if s in corpus_of else ""
        ax.plot(x, y, marker="o", ms=4, lw=1.5, color=colours[s], label=f"val CE {s}{tag}")
    return _png(fig, ax)


def plot_grad_norm(train: list[dict], grad_clip: float | None, title: str) -> bytes:
    fig, ax = _new_axes(f"{title}: gradient norm", "global gradient norm")
    x, y = series(train, "grad_norm")
    ax.plot(x, y, lw=0.9, color="tab:purple", label="grad norm")
    if grad_clip:
        ax.axhline(grad_clip, ls="--", lw=1, color="grey", label=f"clip = {grad_clip:g}")
    positive = [v for v in y if v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log")  # early spikes would otherwise flatten the rest of the curve
    return _png(fig, ax)


def plot_kl(train: list[dict], val: list[dict], title: str) -> bytes:
    fig, ax = _new_axes(f"{title}: KL to the base model", "KL (nats/token)")
    _train_lines(ax, train, "kl", "train KL")
    for c in ("general", "domain"):
        x, y = series(val, f"kl_to_base/{c}")
        if x:
            ax.plot(x, y, marker="o", ms=4, lw=1.5, ls="--", color=CORPUS_COLOURS[c], label=f"val KL-to-base {c}")
    return _png(fig, ax)


def plot_lr(train: list[dict], title: str) -> bytes:
    fig, ax = _new_axes(f"{title}: learning rate", "learning rate")
    x, y = series(train, "lr")
    ax.plot(x, y, lw=1.2, color="tab:green", label="lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _png(fig, ax)


def plot_run(run_dir: Path) -> list[Path]:
    """Write ce.png, grad_norm.png, kl.png and lr.png into run_dir/plots/; return their paths."""
    folder = RunFolder(run_dir)
    train, val = _rows(folder.path)
    corpus_of, grad_clip = _run_info(folder.path)
    title = folder.path.name
    return [
        folder.write_file(f"{PLOTS_DIR}/ce.png", plot_ce(train, val, corpus_of, title)),
        folder.write_file(f"{PLOTS_DIR}/grad_norm.png", plot_grad_norm(train, grad_clip, title)),
        folder.write_file(f"{PLOTS_DIR}/kl.png", plot_kl(train, val, title)),
        folder.write_file(f"{PLOTS_DIR}/lr.png", plot_lr(train, title)),
    ]


def plot_compare(run_dirs: list[Path], out: Path, key: str = "ce/domain", records: str = "val",
                 title: str | None = None) -> Path:
    """One metric of several runs on one axis (e.g. an α or ratio sweep); records: "val" or "train"."""
    fig, ax = _new_axes(title or f"{'validation' if records == 'val' else 'training'} {key} across runs", key)
    colours = colormaps["tab10"]
    plotted = 0
    for i, run_dir in enumerate(map(Path, run_dirs)):
        train, val = _rows(run_dir)
        x, y = series(val if records == "val" else train, key)
        if not x:
            log.warning("%s: no validation %s; left out of the comparison", run_dir, key)
            continue
        ax.plot(x, y, marker="o", ms=4, lw=1.5, color=colours(i % 10), label=run_dir.name)
        plotted += 1
    if not plotted:
        raise PlotError(f"none of the runs has validation values for {key!r}")
    out = Path(out)  # a file of the caller's choosing, outside any run folder
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, _png(fig, ax))
    return out
