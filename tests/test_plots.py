"""Plots from metrics.jsonl: synthetic run folders (a trainer still writing its last line)."""

import json
import math

import pytest

from mol.config import dump_config, load_config
from mol.plots import plot_compare, plot_run


def _synthetic_metrics(run_dir, steps=30, partial_tail=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(0, steps + 1, 5):
        lines.append({"type": "val", "step": step, "ce/med": 3.0 - 0.02 * step, "ce/pubmed": 3.2 - 0.02 * step,
                      "ce/gen": 3.5 + 0.001 * step, "ce/domain": 3.1 - 0.02 * step, "ce/general": 3.5,
                      "kl_to_base/general": 0.001 * step, "kl_to_base/domain": 0.01 * step, "tokens/med": 100})
    for step in range(1, steps + 1):
        rec = {"type": "train", "step": step, "loss": 3.0, "ce/domain": 3.0 - 0.02 * step + 0.1 * math.sin(step),
               "kl/domain": 0.01 * step, "kl/general": 0.001 * step, "grad_norm": 10.0 / step,
               "lr": 1e-4 * min(1, step / 3), "tokens": 512, "tokens_per_s": 1e3, "elapsed_s": step}
        if step % 2:  # a step that drew no general sequence has no general keys
            rec["ce/general"] = 3.5
        lines.append(rec)
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if partial_tail:
        text += '{"type": "train", "step": 31, "lo'  # a trainer still writing
    (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def test_plot_run_writes_four_pngs(tmp_path):
    run_dir = _synthetic_metrics(tmp_path / "run-a")
    # the config tells which corpus each validation subset belongs to (colour families, clip line)
    dump_config(load_config(data={"data": {"sources": [
        {"path": "m.jsonl", "corpus": "domain", "subset": "med"},
        {"path": "p.jsonl", "corpus": "domain", "subset": "pubmed"},
        {"path": "g.jsonl", "corpus": "general", "subset": "gen"}]}}), run_dir / "config.yaml")
    paths = plot_run(run_dir)
    assert sorted(p.name for p in paths) == ["ce.png", "grad_norm.png", "kl.png", "lr.png"]
    for p in paths:
        assert p.parent == run_dir / "plots"
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_plot_compare_and_cli(tmp_path, capsys):
    from stages.plots import main

    a = _synthetic_metrics(tmp_path / "alpha-0.01")
    b = _synthetic_metrics(tmp_path / "alpha-0.5", steps=20, partial_tail=False)
    out = plot_compare([a, b], tmp_path / "cmp" / "ce_domain.png")
    assert out.is_file() and out.stat().st_size > 5000
    with pytest.raises(ValueError, match="no-such-key"):
        plot_compare([a], tmp_path / "x.png", key="no-such-key")

    assert main([str(a), str(b), "--compare", str(tmp_path / "cmp.png"), "--key", "ce/general"]) == 0
    printed = capsys.readouterr().out.split()
    assert str(b / "plots" / "kl.png") in printed and str(tmp_path / "cmp.png") in printed
    assert main([str(tmp_path / "empty")]) == 2
