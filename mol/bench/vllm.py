"""Stage 1 on vLLM against vLLM's own bare prompt pass and against the transformers backend.

vLLM lives in a venv of its own (`make vllm-setup`), so the measurement runs there, in one child
process that holds every variant at once and times them interleaved round by round on the same
batch of cached sequences:

- vllm_stage1: what Stage 1 runs per batch (`VllmTeacher`: the engine's hidden states, then the
  top-k labels and the exact residual from them);
- vllm_hidden: the engine's part of it alone;
- vllm_bare: a generate engine's prompt pass with no log-probs (max_tokens = 1), the floor;
- vllm_prompt_logprobs: the same engine asked for the top-k prompt log-probs (the route Stage 1
  does not take: its residual is 1 - Σp from fp32 log-probs), parsed as the old backend did;
- transformers_stage1: `mol.teacher.teacher_labels`, the transformers backend.

    <vllm venv>/bin/python -m mol.bench.vllm SPEC.json OUT.json
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


def vllm_interpreter() -> Optional[str]:
    """The vLLM venv's python: MOL_VLLM_PYTHON, else the checkout's .venv-vllm, else None."""
    exe = os.environ.get("MOL_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    return exe if Path(exe).is_file() else None


def bench_vllm(model_path: Path, rows: list[dict], *, k: int, chunk: int, dtype: str, pad_id: int, reps: int,
               warmup: int, engine_kwargs: dict, threads: Optional[int], timeout: float = 1800) -> dict:
    """Run the measurement in the vLLM venv; {"skipped": reason} where there is none."""
    from .. import cache as C

    exe = vllm_interpreter()
    if exe is None:
        return {"skipped": "no vLLM venv (make vllm-setup, or MOL_VLLM_PYTHON)"}
    with tempfile.TemporaryDirectory(prefix="mol-bench-vllm-") as tmp:
        spec = {"model_path": str(model_path), "seqs": [np.asarray(r[C.INPUT_IDS]).tolist() for r in rows],
                "k": k, "chunk": chunk, "dtype": dtype, "pad_id": pad_id, "reps": reps, "warmup": warmup,
                "engine_kwargs": engine_kwargs}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.run([exe, "-m", "mol.bench.vllm", str(Path(tmp) / "spec.json"), str(Path(tmp) / "out.json")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"the vLLM bench child failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads((Path(tmp) / "out.json").read_text())


def _parse_prompt_logprobs(prompt_logprobs, k: int) -> None:
    """The per-position Python work a prompt-log-probs backend cannot avoid: k entries sorted into arrays."""
    for pos in prompt_logprobs[1:]:
        entries = sorted(((lp.logprob, tid) for tid, lp in pos.items() if (lp.rank or 0) <= k), reverse=True)[:k]
        np.array([e[1] for e in entries]), np.exp(np.array([e[0] for e in entries]))


def measure(spec: dict) -> dict:
    """In the vLLM venv: every variant built once, then timed interleaved (see the module docstring)."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from ..config import ModelConfig
    from ..model import load_model, pick_device
    from ..labels import teacher_labels
    from ..vllm_teacher import VllmTeacher, engine_arguments
    from .timing import interleaved, med

    device = pick_device("auto")
    seqs = [np.asarray(s, dtype=np.int64) for s in spec["seqs"]]
    k, chunk, model_path = spec["k"], spec["chunk"], Path(spec["model_path"])
    max_len = max(len(s) for s in seqs)
    teacher = VllmTeacher(model_path, k, chunk, device=device, dtype=spec["dtype"], max_model_len=max_len,
                          engine_kwargs=spec["engine_kwargs"])
    gen = LLM(model=str(model_path), runner="generate", max_logprobs=k, logprobs_mode="raw_logprobs",
              **engine_arguments(device, spec["dtype"], max_len + 1, spec["engine_kwargs"]))
    prompts = [TokensPrompt(prompt_token_ids=s.tolist()) for s in seqs]
    bare = SamplingParams(max_tokens=1, detokenize=False)
    with_lp = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)
    hf = load_model(model_path, ModelConfig(name=str(model_path), dtype=spec["dtype"]), device=device).eval()

    def prompt_logprobs():
        for o in gen.generate(prompts, with_lp, use_tqdm=False):
            _parse_prompt_logprobs(o.prompt_logprobs, k)

    tasks = {"vllm_stage1": lambda: teacher(seqs), "vllm_hidden": lambda: teacher.hidden(seqs),
             "vllm_bare": lambda: gen.generate(prompts, bare, use_tqdm=False),
             "vllm_prompt_logprobs": prompt_logprobs,
             "transformers_stage1": lambda: teacher_labels(hf, seqs, k, chunk, spec["pad_id"], device)}
    t = interleaved(tasks, spec["reps"], spec["warmup"])
    tokens = int(sum(len(s) for s in seqs))
    rate = {name: tokens / med(t[name]) for name in tasks}
    import vllm

    return {"batch": len(seqs), "seq_len": max_len, "tokens": tokens, "dtype": teacher.dtype, "device": str(device),
            "vllm_version": vllm.__version__, "torch_threads": torch.get_num_threads(), "times": t,
            "tokens_per_s": rate,
            "ratio_stage1_vs_bare": med(t["vllm_bare"]) / med(t["vllm_stage1"]),
            "ratio_stage1_vs_hidden": med(t["vllm_hidden"]) / med(t["vllm_stage1"]),
            "ratio_stage1_vs_transformers": med(t["transformers_stage1"]) / med(t["vllm_stage1"]),
            "ratio_prompt_logprobs_vs_bare": med(t["vllm_bare"]) / med(t["vllm_prompt_logprobs"])}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(argv[0]).read_text())
    out = measure(spec)
    Path(argv[1]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
