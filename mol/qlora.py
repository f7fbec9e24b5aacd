"""`make qlora`: does MoL pull a 4-bit student back toward the full-precision base?

Three runs on one config and one cache (labelled by the unquantized base), as real `stages.train`
subprocesses, the same batch, seed and data order:

    fp32-mol   the full-precision student, MoL            (the reference)
    nf4-mol    the nf4 student (QLoRA), MoL               the KL term sees the quantization drift
    nf4-ce     the nf4 student, CE on everything          what a plain QLoRA recipe does

The nf4 student's validation KL-to-base at step 0 is the quantization drift (a fp32 student scores
the cache's rounding there). The question: does MoL bring the nf4 student's general KL-to-base below
that step-0 value, where CE-only does not? Also measured: each run's peak resident memory (VmHWM
of its process, mol.stage_process: the same batch, so nf4 vs fp32 is the weights' difference), and the nf4-mol
adapter moved onto the full-precision base (what `make eval` and a merge use), evaluated on the same
held-out sequences. Finished runs are reused, so a second call only redraws the page.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from .batching import subset_losses
from .cache import TeacherCache
from .model import load_model
from .run_folder import PEAK_RSS, RunFolder, read_config, read_metrics, read_summary, train_val
from .stage_process import run_stage

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class StudyRun:
    name: str
    label: str
    overrides: tuple[str, ...]


RUNS = (
    StudyRun("fp32-mol", "fp32 student + MoL", ()),
    StudyRun("nf4-mol", "nf4 student + MoL", ("model.quantization=nf4",)),
    StudyRun("nf4-ce", "nf4 student + CE only", ("model.quantization=nf4", "train.mode=ce")),
)


def train_run(config: Path, overrides: list[str], out: Path, run: StudyRun) -> None:
    """One run as a subprocess (resumed if killed before); its peak RSS from the kernel (wait4)."""
    folder = RunFolder(out / run.name)
    if folder.finished() and (folder.path / PEAK_RSS).is_file():
        log.info("%s: finished already", run.name)
        return
    args = [str(config), *overrides, f"train.out_dir={out}", f"train.run_name={run.name}",
            *run.overrides] + (["train.resume=true"] if folder.holds_run() else [])
    log.info("training %s: %s", run.name, " ".join(["stages.train", *args]))
    done = run_stage("stages.train", args, out / "logs" / f"{run.name}.log")
    folder.write_file(PEAK_RSS, (json.dumps({"peak_rss_mb": done.peak_rss_mb, "wall_s": done.seconds}) + "\n").encode())


def on_full_precision_base(run_dir: Path) -> dict:
    """The run's adapter on the unquantized base, on the run's own validation sequences."""
    import torch
    from peft import PeftModel

    cfg, summary = read_config(run_dir), read_summary(run_dir)
    cache = TeacherCache(summary["cache_dir"])
    base = load_model(Path(summary["model_path"]), cfg.model, device=torch.device("cpu"))
    model = PeftModel.from_pretrained(base, RunFolder(run_dir).weights_dir("lora")).eval()
    return subset_losses(model, cache.load("val"), cache.k, torch.device("cpu"), batch_size=cfg.eval.batch_size,
                         chunk=cfg.train.loss_chunk, max_per_subset=cfg.eval.max_val_sequences)


def _val(run_dir: Path) -> list[dict]:
    return train_val(read_metrics(run_dir))[1]


def results(out: Path) -> dict:
    res = {}
    for run in RUNS:
        val = _val(out / run.name)
        rss = json.loads((out / run.name / PEAK_RSS).read_text())
        summary = read_summary(out / run.name)
        res[run.name] = {"label": run.label, "steps": [r["step"] for r in val],
                         "kl_to_base/general": [r["kl_to_base/general"] for r in val],
                         "ce/domain": [r["ce/domain"] for r in val], "ce/general": [r["ce/general"] for r in val],
                         "peak_rss_mb": rss["peak_rss_mb"], "wall_s": rss["wall_s"],
                         "train_seconds": summary["train_seconds"],
                         "model_rss_mb": summary["memory"]["after_model_load"]["rss_mb"],
                         "model_tensors_mb": summary["memory"]["model_tensors_mb"],
                         "training_peak_rss_mb": summary["memory"]["end"]["peak_rss_mb"]}
    return res


def _plot(res: dict, key: str, ylabel: str, path: Path) -> Path:
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for name, r in res.items():
        ax.plot(r["steps"], r[key], marker="o", ms=4, lw=1.5, label=r["label"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _page(res: dict, fp_base: dict, command: str, machine: str) -> str:
    import math

    rows = ["| run | KL-to-base, general: step 0 → end | below its step 0? | ppl/domain: step 0 → end | "
            "ppl/general: step 0 → end | the student's tensors | resident after loading it | "
            "peak RSS while training | training time |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        kl0, kl1 = r["kl_to_base/general"][0], r["kl_to_base/general"][-1]
        rows.append(f"| {r['label']} | {kl0:.4f} → {kl1:.4f} | {'yes' if kl1 < kl0 else 'no'} "
                    f"({kl1 - kl0:+.4f}) | {math.exp(r['ce/domain'][0]):.3f} → {math.exp(r['ce/domain'][-1]):.3f} | "
                    f"{math.exp(r['ce/general'][0]):.3f} → {math.exp(r['ce/general'][-1]):.3f} | "
                    f"{r['model_tensors_mb']:.0f} MB | {r['model_rss_mb']:.0f} MB | {r['training_peak_rss_mb']:.0f} MB | "
                    f"{r['train_seconds']:.0f} s |")
    nf4 = res["nf4-mol"]
    rows.append(f"| nf4 + MoL adapter on the fp32 base | — → {fp_base['kl_to_base/general']:.4f} | | "
                f"— → {math.exp(fp_base['ce/domain']):.3f} | — → {math.exp(fp_base['ce/general']):.3f} | | | | |")
    drift = nf4["kl_to_base/general"][0]
    return "\n".join([
        "# The 4-bit student and MoL (`make qlora`)", "",
        f"Command: `{command}`  ", f"Machine: {machine}", "",
        "One cache (labelled by the full-precision base), three Stage 2 runs with the same data order, "
        "seed and batch. KL-to-base is the truncated reverse KL of the student to the cached base labels on "
        "the held-out general sequences; the nf4 student's value at step 0 is the quantization drift "
        f"({drift:.4f} nats/token here).", "",
        *rows, "",
        "![KL to base](kl_to_base_general.png)", "", "![domain CE](ce_domain.png)", "",
    ])


def run_study(config: Path, overrides: list[str], out: Path, page: Path, command: str, machine: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for run in RUNS:
        train_run(config, overrides, out, run)
    res = results(out)
    fp_base = on_full_precision_base(out / "nf4-mol")
    page.mkdir(parents=True, exist_ok=True)
    _plot(res, "kl_to_base/general", "validation KL to base, general (nats/token)", page / "kl_to_base_general.png")
    _plot(res, "ce/domain", "validation CE, domain (nats/token)", page / "ce_domain.png")
    (page / "results.json").write_text(json.dumps({"runs": res, "nf4_mol_on_fp32_base": fp_base,
                                                   "command": command, "machine": machine}, indent=2) + "\n")
    md = page / "README.md"
    md.write_text(_page(res, fp_base, command, machine))
    return md
