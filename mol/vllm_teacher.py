"""Stage 1 on vLLM (`teacher.backend: vllm`): vLLM runs the frozen model's body, MoL computes the labels.

The engine is a pooling runner that returns, per prompt, the final (post-norm) hidden states of
every position (`PoolerConfig(task="token_embed", pooling_type="ALL", use_activation=False)`).
The labels are then computed from them by `mol.labels.topk_from_hidden`, the same code the
transformers backend runs: fp32 logits against the model's output projection, chunked top-k, and
a residual summed over the positions outside the top-k (its own numerator, never 1 - Σp).

Why not vLLM's prompt log-probs: they are fp32 log-softmax values, so the residual 1 - Σ exp(lp)
loses everything below fp32's ulp of 1 (at r = 1e-6 the relative error was 54× on BoolQ); and
building a Python dict of k entries per position made them slower than this route on the default
model (docs/vllm.md). Here the residual meets the cache's bound whatever the backend.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, unless the user set it): no
EngineCore process exists that could outlive a killed Stage 1, and no shared memory is left behind.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path

import torch

from .config import ConfigError

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30
"""KV cache reserved on CPU unless teacher.vllm_kwargs sets kv_cache_memory_bytes or
gpu_memory_utilization: vLLM's CPU default (92 % of the NUMA node) refuses to start beside any other
process, and one scoring pass of data.max_seq_len-token prompts needs far less."""


def engine_dtype(dtype: str, on_gpu: bool) -> str:
    """model.dtype for the engine: `auto` is bf16 on a GPU and fp32 on CPU, as for the transformers
    backend (vLLM's own `auto` would take the checkpoint's bf16 on CPU too)."""
    if dtype == "auto":
        return "bfloat16" if on_gpu else "float32"
    return dtype


def engine_arguments(device: torch.device, dtype: str, max_model_len: int, engine_kwargs: dict | None) -> dict:
    """vllm.LLM arguments shared by every engine MoL builds (the teacher's, the bench's bare pass):
    the dtype rule, the longest prompt, a CPU KV-cache size, then the user's teacher.vllm_kwargs."""
    kwargs = {"dtype": engine_dtype(dtype, device.type == "cuda"), "max_model_len": max_model_len,
              "enable_prefix_caching": False, **(engine_kwargs or {})}
    if device.type != "cuda":
        if "kv_cache_memory_bytes" not in kwargs and "gpu_memory_utilization" not in kwargs:
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        # vLLM's torch.compile of the model took 50-60 s at every start here (its cache missed), more
        # than the whole default pass's labelling; eager is the CPU default ({enforce_eager: false} to compile)
        kwargs.setdefault("enforce_eager", True)
    return kwargs


def output_projection(model_path: Path) -> torch.Tensor:
    """The model's output projection [V, H] read from its safetensors files (tied: the input embedding)."""
    from safetensors import safe_open

    path = Path(model_path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        files = sorted(path.glob("*.safetensors"))
        weight_map = {}
        for f in files:
            with safe_open(f, framework="pt") as sf:
                weight_map.update({name: f.name for name in sf.keys()})
    names = [n for n in weight_map if n == "lm_head.weight" or n.endswith(".lm_head.weight")]
    if not names:  # tied embeddings (SmolLM2, Qwen3-0.6B): the output projection is the input embedding
        names = [n for n in weight_map if n.endswith(("embed_tokens.weight", "wte.weight"))]
    if not names:
        raise ConfigError([f"teacher.backend = vllm: no lm_head or embed_tokens weight in {path}'s safetensors"])
    with safe_open(path / weight_map[names[0]], framework="pt") as sf:
        return sf.get_tensor(names[0])


class VllmTeacher:
    """A vLLM engine set up for one labelling pass: token-id prompts in, per-position hidden states
    out, labelled by `topk_from_hidden` on `device` (the GPU the engine runs on, or the CPU)."""

    def __init__(self, model_path: Path, k: int, chunk: int, *, device: torch.device, dtype: str = "auto",
                 max_model_len: int, engine_kwargs: dict | None = None):
        try:
            from vllm import LLM
            from vllm.config import PoolerConfig
        except ImportError as e:
            raise ConfigError([f"teacher.backend = vllm needs vLLM: `make vllm-setup` (a venv of its own, "
                               f".venv-vllm), then run Stage 1 with .venv-vllm/bin/python ({e})"]) from None
        # read when the engine starts, not at import; set only in a process that really starts one
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.k, self.chunk, self.device = k, chunk, device
        kwargs = engine_arguments(device, dtype, max_model_len, engine_kwargs)
        self.dtype = kwargs["dtype"]
        # prefix caching (off in engine_arguments) would hand back no hidden states for cached positions
        self.llm = LLM(model=str(model_path), runner="pooling",
                       pooler_config=PoolerConfig(task="token_embed", pooling_type="ALL", use_activation=False),
                       **kwargs)
        self.weight = output_projection(model_path).to(self.device, torch.float32)
        self.vocab_size = self.weight.shape[0]

    def hidden(self, batch: list) -> list[torch.Tensor]:
        """Per sequence [L, H] final hidden states, as the engine computed them."""
        from vllm.inputs import TokensPrompt

        outs = self.llm.encode([TokensPrompt(prompt_token_ids=[int(t) for t in s]) for s in batch],
                               pooling_task="token_embed", use_tqdm=False)
        return [o.outputs.data for o in outs]

    @torch.no_grad()
    def __call__(self, batch: list):
        """Same contract as mol.labels.teacher_labels: per sequence (ids [L-1, k], probs [L-1, k], residual [L-1]) numpy."""
        from .labels import topk_from_hidden

        hs = self.hidden(batch)
        h = torch.cat([x[:-1] for x in hs]).to(self.device)
        ids, probs, resid = (t.cpu().numpy() for t in topk_from_hidden(h, self.weight, self.k, self.chunk))
        out, a = [], 0
        for x in hs:
            n = x.shape[0] - 1
            out.append((ids[a:a + n], probs[a:a + n], resid[a:a + n]))
            a += n
        return out

    def close(self) -> None:
        """Shut the engine down and free its memory (a transformers model may load after it)."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm, engine, core
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
