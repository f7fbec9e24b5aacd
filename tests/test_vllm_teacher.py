"""The vLLM backend. Without vLLM: its labels from hidden states through the whole Stage 1 (the engine
replaced by the tiny model's own hidden states), its dtype and output projection. With vLLM (the
venv `make vllm-setup` builds; `make test` passes its interpreter as MOL_VLLM_PYTHON): the real
engine on CPU against the transformers backend and a float64 reference, a SIGKILL mid-pass that
leaves no process behind and resumes byte-identically, and Stage 2 trained from the vLLM cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import GEN, MED, tiny_config, write_jsonl
from mol import cache as C
from mol import vllm_teacher as V
from mol.config import ConfigError, ModelConfig, load_config
from mol.model import load_model
from mol.labels import final_hidden
from mol.teacher import finalize_cache, run_teacher_pass

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- without vLLM


def test_auto_dtype_is_fp32_on_cpu_like_the_transformers_backend():
    assert V.engine_dtype("auto", on_gpu=False) == "float32"
    assert V.engine_dtype("auto", on_gpu=True) == "bfloat16"
    assert V.engine_dtype("float16", on_gpu=False) == "float16"


def test_output_projection_is_the_models(tiny_model_dir, real_model_dir):
    for folder in (tiny_model_dir, real_model_dir):  # both tie it to the input embedding
        model = load_model(folder, ModelConfig(name=str(folder)))
        assert torch.equal(V.output_projection(folder).float(), model.get_output_embeddings().weight.float())


def test_output_projection_missing_is_a_config_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.norm.weight": torch.ones(4)}, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="no lm_head or embed_tokens"):
        V.output_projection(tmp_path)


@pytest.fixture
def hidden_states_engine(tiny_model_dir, monkeypatch):
    """VllmTeacher with the engine's hidden states replaced by the tiny model's own; the list it
    returns records each close()."""
    tiny = load_model(tiny_model_dir, ModelConfig(name=str(tiny_model_dir))).eval()
    closed = []

    class HiddenStatesEngine(V.VllmTeacher):
        def __init__(self, model_path, k, chunk, *, device, dtype, max_model_len, engine_kwargs):
            self.k, self.chunk, self.device, self.dtype = k, chunk, device, V.engine_dtype(dtype, False)
            self.weight = V.output_projection(model_path).float()
            self.vocab_size = self.weight.shape[0]
            self.llm = object()

        def hidden(self, batch):
            with torch.no_grad():
                return [final_hidden(tiny, torch.as_tensor(np.asarray(s, dtype=np.int64))[None])[0] for s in batch]

        def close(self):
            closed.append(True)
            self.llm = None

    monkeypatch.setattr(V, "VllmTeacher", HiddenStatesEngine)
    return closed


def test_stage1_through_the_vllm_path(tiny_model_dir, corpora, tmp_path, hidden_states_engine):
    """run_teacher_pass with backend=vllm, the engine's hidden states replaced by the tiny model's:
    the labels VllmTeacher computes, the deferred finalize (engine closed, then a transformers model
    measures fidelity), and the manifest, against the transformers backend's cache."""
    closed = hidden_states_engine
    ref_dir, _ = run_teacher_pass(load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path / "hf")))
    cfg = load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path / "vllm", teacher={"backend": "vllm"}))
    v_dir, status = run_teacher_pass(cfg)
    assert status == "built" and v_dir.name != ref_dir.name  # the backend is part of the fingerprint
    assert closed == [True]
    ref, got = C.TeacherCache(ref_dir), C.TeacherCache(v_dir)
    assert got.verify() == []
    for unit, ref_unit in zip(got.units, ref.units):  # every unit of a single-process vLLM pass carries its fidelity
        fid, ref_fid = unit.manifest["fidelity"], ref_unit.manifest["fidelity"]
        assert fid["topk_ids_exact_match"] == 1.0 and fid["positions"] == ref_fid["positions"] > 0
        assert fid["kl_quantisation_mean_abs"] == pytest.approx(ref_fid["kl_quantisation_mean_abs"], rel=0.05)
        assert unit.manifest["run"]["dtype"] == "torch.float32"
    a, b = ref.load("train"), got.load("train")
    assert np.array_equal(a.teacher_topk_ids, b.teacher_topk_ids)
    assert np.abs(a.teacher_topk_probs.astype(int) - b.teacher_topk_probs.astype(int)).max() <= 1  # one code step
    assert np.abs(a.teacher_residual.astype(int) - b.teacher_residual.astype(int)).max() <= 1


def test_sharded_vllm_workers_and_finalize_equal_one_vllm_pass(tiny_model_dir, corpora, tmp_path,
                                                                hidden_states_engine):
    """teacher.backend=vllm with two workers on small segments, then finalize: the same shards
    (sha256) and fidelity as a single vLLM pass; each worker closes its engine, and finalize starts
    none (it measures fidelity with a transformers model)."""
    over = {"data": {"segment_bytes": 1024}, "teacher": {"backend": "vllm"}}
    one_dir, _ = run_teacher_pass(load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path / "one", **over)))
    assert len(hidden_states_engine) == 1
    data = tiny_config(tiny_model_dir, corpora, tmp_path / "two", **over)
    for i in range(2):
        data["teacher"].update(num_workers=2, worker_index=i)
        assert run_teacher_pass(load_config(data=data))[1] == "worker-done"
    assert len(hidden_states_engine) == 3
    two_dir, status = finalize_cache(load_config(data=data))
    assert status == "finalized" and two_dir.name == one_dir.name and len(hidden_states_engine) == 3
    one, two = C.TeacherCache(one_dir), C.TeacherCache(two_dir)
    assert two.verify() == []
    for a, b in zip(one.units, two.units):
        assert b.manifest["segments"] > 1 and b.manifest["run"]["workers"] == 2
        assert [s["sha256"] for s in b.manifest["shards"]] == [s["sha256"] for s in a.manifest["shards"]]
        assert b.manifest["fidelity"] == a.manifest["fidelity"]


def test_without_vllm_the_error_says_how_to_install(tiny_model_dir, corpora, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *a, **kw):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    cfg = load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path, teacher={"backend": "vllm"}))
    with pytest.raises(ConfigError, match=r"make vllm-setup"):
        run_teacher_pass(cfg)


# --------------------------------------------------------------------------- the real engine


def vllm_python() -> str:
    exe = os.environ.get("MOL_VLLM_PYTHON")
    if not exe:
        pytest.skip("MOL_VLLM_PYTHON is not set (`make test` sets it to the venv `make vllm-setup` builds)")
    if not Path(exe).is_file():
        pytest.fail(f"MOL_VLLM_PYTHON={exe} does not exist: run `make vllm-setup`")
    return exe


def stage1(config: Path, cache_root: Path, *over: str, marker: str = "", **popen) -> subprocess.Popen:
    """Stage 1 on vLLM in its own venv and process session, tagged by an environment marker that
    every process it starts inherits."""
    env = {**os.environ, "MOL_TEST_MARKER": marker or uuid.uuid4().hex, "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([vllm_python(), "-m", "stages.teacher_cache", str(config), "teacher.backend=vllm",
                             f"teacher.cache_root={cache_root}", *over], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **popen)


def marked_processes(marker: str) -> list[int]:
    """Every live process whose environment carries MOL_TEST_MARKER=marker."""
    needle = f"MOL_TEST_MARKER={marker}".encode()
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if needle in (p / "environ").read_bytes().split(b"\0"):
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def set_dir(cache_root: Path) -> Path:
    sets = list((cache_root / C.SETS_DIR).iterdir())
    assert len(sets) == 1, sets
    return sets[0]


def shard_files(cache_root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache_root)): p.read_bytes() for p in sorted(cache_root.glob("units/*/shard-*.parquet"))}


PARITY = {"data": {"max_seq_len": 128, "val_fraction": 0.2},
          "teacher": {"top_k": 31, "batch_size": 4, "rows_per_shard": 2, "fidelity_sequences": 2}}


@pytest.fixture(scope="module")
def vllm_runs(real_model_dir, tmp_path_factory):
    """The real SmolLM2 through vLLM (fp32 on CPU) twice: once uninterrupted, once killed (SIGKILL) as
    soon as its first shard is on disk and then resumed; and the transformers backend once."""
    vllm_python()
    root = tmp_path_factory.mktemp("vllm")
    corpora = {"med": write_jsonl(root / "med.jsonl", MED), "gen": write_jsonl(root / "gen.jsonl", GEN)}
    cfg = tiny_config(real_model_dir, corpora, root / "unused", **PARITY)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    t0 = time.time()
    whole = stage1(config, root / "whole")
    out_whole, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, out_whole[-4000:]
    seconds = time.time() - t0

    marker = uuid.uuid4().hex
    killed = stage1(config, root / "killed", marker=marker)
    deadline = time.time() + 300
    while not list((root / "killed").glob("units/*/shard-*.parquet")) and killed.poll() is None:
        assert time.time() < deadline, "no shard within 300 s"
        time.sleep(0.05)
    before = marked_processes(marker)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    time.sleep(1.0)
    after = marked_processes(marker)
    complete_at_kill = (root / "killed" / C.SETS_DIR).is_dir() and any((root / "killed" / C.SETS_DIR).glob("*/manifest.json"))
    resumed = stage1(config, root / "killed")
    out_resumed, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out_resumed[-4000:]

    hf_dir, _ = run_teacher_pass(load_config(data={**cfg, "teacher": {**cfg["teacher"],
                                                                      "cache_root": str(root / "hf")}}))
    print(f"vllm fixture: whole pass {seconds:.0f} s, total {time.time() - t0:.0f} s, {len(before)} process(es) at the kill")
    return {"root": root, "cfg": cfg, "whole": set_dir(root / "whole"), "hf": hf_dir, "out_whole": out_whole,
            "out_resumed": out_resumed, "killed_pids": before, "survivors": after, "seconds": seconds,
            "complete_at_kill": complete_at_kill}


def float64_reference(model, w64: torch.Tensor, input_ids: np.ndarray, ids: np.ndarray):
    """Exact probabilities of `ids` and the residual outside them, from the transformers model's fp32
    hidden states and float64 logits."""
    with torch.no_grad():
        h = final_hidden(model, torch.as_tensor(input_ids)[None])[0, :-1].double()
        logp = torch.log_softmax(h @ w64.T, -1)
        idx = torch.as_tensor(ids.astype(np.int64))
        p = logp.gather(-1, idx).exp()
        outside = logp.exp().scatter(-1, idx, 0.0).sum(-1)
    return p.numpy(), outside.numpy()


def test_vllm_parity_with_transformers_and_float64(vllm_runs, real_model_dir):
    """fp32 vLLM on CPU vs the transformers backend (same model, same sequences) and vs float64:
    the same top-31 ids, probabilities on the √p grid, the residual within the schema's bound."""
    v, hf = C.TeacherCache(vllm_runs["whole"]), C.TeacherCache(vllm_runs["hf"])
    assert v.verify() == [] and {u.key["backend"] for u in v.units} == {"vllm"}
    a, b = v.load("train"), hf.load("train")
    assert np.array_equal(a.input_ids, b.input_ids)
    same = (a.teacher_topk_ids == b.teacher_topk_ids).all(1)
    assert same.mean() >= 0.999, same.mean()
    # where the ids agree, the two engines' codes are at most one grid step apart
    assert np.abs(a.teacher_topk_probs.astype(int) - b.teacher_topk_probs.astype(int))[same].max() <= 1
    assert np.abs(a.teacher_residual.astype(int) - b.teacher_residual.astype(int))[same].max() <= 1

    model = load_model(real_model_dir, ModelConfig(name=str(real_model_dir))).eval()
    w64 = model.get_output_embeddings().weight.double()
    worst_p, rel_r, small_r = 0.0, [], 0
    for i in range(len(a)):
        row = a.row(i)
        p, r = float64_reference(model, w64, row[C.INPUT_IDS], row[C.TOPK_IDS])
        # the √p grid's half step, plus 1e-4 relative for fp32 kernels that differ between the engines
        bound = np.sqrt(p) / C.PROB_LEVELS + 1.0 / C.PROB_LEVELS ** 2 + 1e-4 * p
        worst_p = max(worst_p, float((np.abs(row[C.TOPK_PROBS] - p) / bound).max()))
        keep = r >= C.RESIDUAL_FLOOR
        rel_r.append(np.abs(row[C.RESIDUAL][keep] / r[keep] - 1))
        small_r += int((r < 1e-6).sum())
    rel_r = np.concatenate(rel_r)
    assert worst_p <= 1.0, worst_p
    # the schema's 5.3e-4 (half a code of the log grid) plus the engines' fp32 difference (1e-4)
    assert rel_r.max() <= 6.3e-4, (np.median(rel_r), rel_r.max())
    assert small_r > 0  # the sample reaches the small residuals where 1 - Σp from log-probs failed


def test_vllm_kill_leaves_no_engine_and_resumes_byte_identically(vllm_runs):
    assert vllm_runs["killed_pids"], "the Stage 1 process was not found by its marker"
    assert vllm_runs["survivors"] == [], f"processes left after SIGKILL: {vllm_runs['survivors']}"
    assert "resumed" in vllm_runs["out_resumed"] or vllm_runs["complete_at_kill"], vllm_runs["out_resumed"][-2000:]
    root = vllm_runs["root"]
    whole, resumed = C.TeacherCache(vllm_runs["whole"]), C.TeacherCache(set_dir(root / "killed"))
    assert resumed.verify() == []
    # the CPU engine is deterministic for the same batches: the resumed shards are the same bytes
    assert shard_files(root / "killed") == shard_files(root / "whole")
    assert [u.manifest["fidelity"] for u in resumed.units] == [u.manifest["fidelity"] for u in whole.units]
    for out in (vllm_runs["out_whole"], vllm_runs["out_resumed"]):
        assert "leaked shared_memory" not in out and "Traceback" not in out


def test_stage2_trains_from_a_vllm_cache(vllm_runs, real_model_dir, tmp_path):
    """The untouched student (SmolLM2 in fp32) against the vLLM cache: step-0 KL to the base <= 1e-4."""
    from conftest import metrics_records
    from mol.train import train

    cfg = vllm_runs["cfg"]
    d = {**cfg, "teacher": {**cfg["teacher"], "backend": "vllm", "cache_root": str(vllm_runs["root"] / "whole")},
         "train": {"global_batch": 2, "micro_batch": 2, "max_steps": 1, "eval_every": 1, "lr": 1e-4,
                   "out_dir": str(tmp_path / "runs"),
                   "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}}
    run_dir = train(load_config(data=d))
    m = metrics_records(run_dir)
    val0 = next(r for r in m if r["type"] == "val" and r["step"] == 0)
    assert val0["kl_to_base/general"] <= 1e-4 and val0["kl_to_base/domain"] <= 1e-4, val0
    assert all(np.isfinite(r["loss"]) for r in m if r["type"] == "train")


@pytest.mark.faults
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_vllm_signal_leaves_no_engine(sig, real_model_dir, tmp_path):
    corpora = {"med": write_jsonl(tmp_path / "med.jsonl", MED), "gen": write_jsonl(tmp_path / "gen.jsonl", GEN)}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(real_model_dir, corpora, tmp_path / "unused", **PARITY)))
    marker = uuid.uuid4().hex
    p = stage1(config, tmp_path / "c", marker=marker)
    deadline = time.time() + 300
    while not list((tmp_path / "c").glob("units/*/shard-*.parquet")) and p.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    assert marked_processes(marker)
    os.kill(p.pid, sig)
    p.wait(timeout=120)
    time.sleep(1.0)
    assert marked_processes(marker) == []


def test_bench_measures_the_vllm_ratios(real_model_dir):
    """`make bench`'s vLLM section, at a tiny size: every variant runs in the vLLM venv and both
    figures come out of one interleaved measurement."""
    vllm_python()
    from mol.bench.report import VLLM_FIGURE_IDS, vllm_figures
    from mol.bench.vllm import bench_vllm

    rows = [{C.INPUT_IDS: np.arange(100 + i, 164 + i)} for i in range(2)]
    v = bench_vllm(real_model_dir, rows, k=31, chunk=64, dtype="auto", pad_id=0, reps=1, warmup=0,
                   engine_kwargs={}, threads=2)
    assert v["dtype"] == "float32" and v["tokens"] == 128
    for key in ("ratio_stage1_vs_bare", "ratio_stage1_vs_transformers", "ratio_stage1_vs_hidden",
                "ratio_prompt_logprobs_vs_bare"):
        assert np.isfinite(v[key]) and v[key] > 0, key
    assert [f["id"] for f in vllm_figures(v)] == list(VLLM_FIGURE_IDS)
