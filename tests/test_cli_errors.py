"""A user's mistake at any entry point ends as one `error: ...` line naming the file, field or option,
exit 2, no traceback (issue 23). Each case runs a stage's `main(argv)` in-process; where the mistake
would otherwise surface only after work (a bench, an experiment, a download), that work is replaced
by a stub that fails the test, so the refusal must come first."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import GEN, MED, alias_bomb, tiny_config, write_jsonl
from mol.config import dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = str(ROOT / "data/default.yaml")


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory) -> dict:
    """A tiny model's cache, its config file and a finished one-step run (plus a copy of that run
    whose adapter is a pickled adapter_model.bin); a file and a folder to give where the other is due."""
    from mol.train import train

    root = tmp_path_factory.mktemp("cli")
    corpora = {"med": write_jsonl(root / "med.jsonl", MED), "gen": write_jsonl(root / "gen.jsonl", GEN)}
    data = tiny_config(tiny_model_dir, corpora, root / "caches")
    data["train"] = {"max_steps": 1, "global_batch": 2, "micro_batch": 2, "out_dir": str(root / "runs"),
                     "run_name": "done", "lora": {"r": 2, "alpha": 4}}
    data["eval"] = {"mcq_items": 0}
    cfg = load_config(data=data)
    from mol.teacher import run_teacher_pass

    run_teacher_pass(cfg)
    run = train(cfg)
    pickled = root / "runs" / "pickled"
    shutil.copytree(run, pickled)
    from safetensors.torch import load_file

    adapter = pickled / "adapter"
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    for name, file, text in (("torn-summary", "summary.json", "{bad"), ("torn-config", "config.yaml", "train: [1,\n")):
        shutil.copytree(run, root / "runs" / name)
        (root / "runs" / name / file).write_text(text)
    dump_config(cfg, root / "cfg.yaml")
    (root / "afile").write_text("not a folder\n")
    (root / "adir").mkdir()
    (root / "bad.yaml").write_text("model: {name: x\n  bad")
    (root / "latin1.yaml").write_bytes('model:\n  name: "caf\xe9"\n'.encode("latin-1"))
    (root / "bad.json").write_text("{bad")
    (root / "bomb.yaml").write_text((root / "cfg.yaml").read_text().replace(
        "  chat_template_kwargs: {}\n", "  chat_template_kwargs:\n" + alias_bomb()))
    assert "*h" in (root / "bomb.yaml").read_text()
    os.mkfifo(root / "corpus.fifo")
    return {"root": root, "cfg": str(root / "cfg.yaml"), "run": str(run), "pickled": str(pickled)}


def _must_not_run(*args, **kwargs):
    raise AssertionError("the mistake was not refused before the work started")


def _fail_model_load(*args, **kwargs):
    from mol.model import ModelError

    raise ModelError("model.quantization=nf4: bitsandbytes cannot run here (test)")


# (id, stage module, argv with {cfg} {root} {run} {pickled} {default}, words the error line holds,
#  {target: replacement} patched in for the case, a path (under {root}) that must not exist after)
CASES = [
    # the config file and its overrides
    ("yaml-syntax", "train", ["{root}/bad.yaml"], ["bad.yaml", "YAML", "line 2"], {}, None),
    ("not-utf8", "train", ["{root}/latin1.yaml"], ["latin1.yaml", "UTF-8"], {}, None),
    ("override-bad-yaml", "train", ["{default}", "train.lr=[1,"], ["train.lr=[1,", "YAML"], {}, None),
    ("config-is-a-folder", "train", ["{root}/adir"], ["adir", "is a folder"], {}, None),
    ("override-without-equals", "train", ["{default}", "train.lr"], ["'train.lr'", "key=value"], {}, None),
    ("override-into-a-string", "train", ["{default}", "model.name.x=1"], ["model.name.x=1", "not a mapping"], {},
     None),
    ("override-index-out-of-range", "train", ["{default}", "data.sources.9.path=x"],
     ["data.sources.9.path=x", "items"], {}, None),
    # the device: refused before the run folder, the cache or the model is touched
    ("cuda-without-cuda-train", "train", ["{cfg}", "model.device=cuda", "train.run_name=cuda"],
     ["model.device=cuda", "CUDA"], {"torch.cuda.is_available": lambda: False}, "runs/cuda"),
    ("cuda-without-cuda-teacher", "teacher_cache", ["{cfg}", "model.device=cuda:0"],
     ["model.device=cuda:0", "CUDA"], {"torch.cuda.is_available": lambda: False, "mol.teacher._prepare": _must_not_run},
     None),
    # folders given as files
    ("out-dir-is-a-file", "train", ["{cfg}", "train.out_dir={root}/afile"], ["train.out_dir", "not a folder"], {},
     None),
    ("cache-root-is-a-file", "teacher_cache", ["{cfg}", "teacher.cache_root={root}/afile"],
     ["teacher.cache_root", "not a folder"], {}, None),
    # names no file system allows, a FIFO as a corpus, a config of nested aliases (issue 34)
    ("run-name-too-long", "train", ["{cfg}", "train.run_name=" + "r" * 256], ["train.run_name", "over the 255"], {},
     None),
    ("out-dir-name-too-long", "train", ["{cfg}", "train.out_dir={root}/" + "o" * 256],
     ["train.out_dir", "a name in it is 256 bytes long"], {}, None),
    ("cache-root-name-too-long", "teacher_cache", ["{cfg}", "teacher.cache_root={root}/" + "c" * 300 + "/x"],
     ["teacher.cache_root", "a name in it is 300 bytes long"], {"mol.teacher._prepare": _must_not_run}, None),
    ("source-name-too-long", "teacher_cache", ["{cfg}", "data.sources.0.path={root}/" + "s" * 256 + ".jsonl"],
     ["data.sources[0]: path", "over the 255"], {"mol.teacher._prepare": _must_not_run}, None),
    ("model-name-too-long", "teacher_cache", ["{cfg}", "model.name={root}/" + "m" * 256],
     ["model.name", "over the 255"], {"mol.teacher._prepare": _must_not_run}, None),
    ("fifo-as-corpus", "teacher_cache", ["{cfg}", "data.sources.0.path={root}/corpus.fifo"],
     ["data.sources[0]: path", "is a FIFO, not a file or a folder"], {"mol.teacher._prepare": _must_not_run}, None),
    ("alias-bomb", "train", ["{root}/bomb.yaml"], ["model.chat_template_kwargs", "YAML aliases here expand"], {}, None),
    # a failed model load leaves no run folder behind
    ("model-load-fails", "train", ["{cfg}", "train.run_name=noload"], ["bitsandbytes"],
     {"mol.train.load_model": _fail_model_load}, "runs/noload"),
    # evaluation
    ("eval-pickled-adapter", "eval", ["{pickled}"], ["adapter_model.bin", "safetensors"],
     {"mol.evaluate.load_model": _must_not_run}, None),
    ("eval-run-is-a-file", "eval", ["{root}/afile"], ["afile", "not a folder"], {}, None),
    ("eval-base-json-not-json", "eval", ["{run}", "--base-json", "{root}/bad.json"], ["bad.json", "JSON"],
     {"mol.evaluate.load_model": _must_not_run}, None),
    ("eval-base-json-is-a-folder", "eval", ["{run}", "--base-json", "{root}/adir"], ["--base-json", "is a folder"],
     {"mol.evaluate.load_model": _must_not_run}, None),
    ("eval-summary-not-json", "eval", ["{root}/runs/torn-summary"], ["summary.json", "JSON"], {}, None),
    ("eval-config-not-yaml", "eval", ["{root}/runs/torn-config"], ["config.yaml", "YAML", "line 2"], {}, None),
    # the other entry points' options
    ("plots-compare-under-a-file", "plots", ["{run}", "--compare", "{root}/afile/x.png"], ["--compare", "afile"],
     {"stages.plots.plot_run": _must_not_run}, None),
    ("cache-info-path-missing", "cache_info", ["--path", "{root}/nope"], ["--path", "does not exist"], {}, None),
    ("cache-info-path-is-a-file", "cache_info", ["--path", "{root}/afile"], ["--path", "not a folder"], {}, None),
    ("cache-info-root-is-a-file", "cache_info", ["--list", "--root", "{root}/afile"], ["--root", "not a folder"], {},
     None),
    ("cache-info-root-missing", "cache_info", ["--list", "--root", "{root}/nope"], ["--root", "does not exist"], {},
     None),
    ("scale-sizes-trailing-comma", "scale", ["--sizes", "1M,"], ["--sizes"], {"stages.scale.run_scale": _must_not_run},
     None),
    ("scale-sizes-zero", "scale", ["--sizes", "0"], ["--sizes", "0"], {"stages.scale.run_scale": _must_not_run}, None),
    ("scale-work-is-a-file", "scale", ["--sizes", "1M", "--work", "{root}/afile"], ["--work", "not a folder"],
     {"stages.scale.run_scale": _must_not_run}, None),
    ("bench-out-is-a-file", "bench", ["--config", "{cfg}", "--out", "{root}/afile"], ["--out", "not a folder"],
     {"stages.bench.run_all": _must_not_run}, None),
    ("bench-threads-zero", "bench", ["--config", "{cfg}", "--threads", "0"], ["--threads", ">= 1"],
     {"stages.bench.run_all": _must_not_run}, None),
    ("experiment-out-is-a-file", "experiment", ["{cfg}", "--out", "{root}/afile"], ["--out", "not a folder"],
     {"stages.experiment.run_experiment": _must_not_run}, None),
    ("experiment-page-is-a-file", "experiment", ["{cfg}", "--page", "{root}/afile/page"], ["--page", "not a folder"],
     {"stages.experiment.run_experiment": _must_not_run}, None),
    ("experiment-mcq-items-negative", "experiment", ["{cfg}", "--mcq-items", "-1"], ["--mcq-items", ">= 0"],
     {"stages.experiment.run_experiment": _must_not_run}, None),
    ("qlora-out-is-a-file", "qlora", ["{cfg}", "--out", "{root}/afile"], ["--out", "not a folder"],
     {"stages.qlora.run_study": _must_not_run}, None),
    ("prepare-data-out-is-a-file", "prepare_data", ["--out", "{root}/afile"], ["--out", "not a folder"],
     {"mol.default_data.build_default_data": _must_not_run}, None),
    ("prepare-data-download-dir-is-a-file", "prepare_data", ["--out", "{root}/pd", "--download-dir", "{root}/afile"],
     ["--download-dir", "not a folder"], {"mol.default_data.build_default_data": _must_not_run}, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_user_mistake_is_one_error_line(case, world, monkeypatch, capsys):
    import importlib

    _, stage, argv, words, patches, absent = case
    for target, value in patches.items():
        monkeypatch.setattr(target, value)
    main = importlib.import_module(f"stages.{stage}").main
    subst = {**world, "default": DEFAULT}
    rc = main([a.format(**subst) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for w in words:
        assert w in err, (w, err)
    assert err.count("invalid config") <= 1, err  # said once, not wrapped in itself
    if absent:
        assert not (world["root"] / absent).exists(), f"{absent} left behind"
