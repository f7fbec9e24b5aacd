"""Shared fixtures and helpers: a tiny random Llama that uses the real SmolLM2 tokenizer (fast tests),
small real-text corpora written as JSONL, a cache built from them (`built`) and what reads it back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mol import cache as C
from mol.config import load_config
from mol.model import convert_default_model, load_tokenizer
from mol.teacher import run_teacher_pass
# no test leaves torch's thread count, dtype, grad mode, working directory or environment changed
from process_state import (_process_state_of_the_module, _process_state_of_the_session,  # noqa: F401
                           _process_state_of_the_test)

def pytest_report_header(config) -> str:
    """The machine a red run ran on: CPU, cores and torch's thread count (identical-run checks depend
    on the thread count)."""
    from mol.machine import machine_info

    m = machine_info()
    return f"machine: {m['cpu']}, {m['usable_cores']} of {m['cores']} cores usable, {m['torch_threads']} torch threads"


MED = [
    {"question": "A 45-year-old man presents with crushing chest pain radiating to the left arm. "
                 "Which enzyme rises first after myocardial infarction?", "answer": "C. Myoglobin"},
    {"question": "Which vitamin deficiency causes scurvy with bleeding gums and poor wound healing?",
     "answer": "A. Vitamin C"},
    {"text": "Metformin lowers hepatic glucose production and is first-line therapy for type 2 "
             "diabetes mellitus. Lactic acidosis is a rare but serious adverse effect."},
    {"messages": [{"role": "user", "content": "What does the loop of Henle do?"},
                  {"role": "assistant", "content": "It concentrates urine by countercurrent multiplication."}]},
] * 6
GEN = [
    {"text": f"Paragraph {i}: The river flows through the old town, past the market square and the "
             f"cathedral, before it reaches the harbour where fishing boats unload their catch."}
    for i in range(30)
]


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    return convert_default_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_model_dir) -> Path:
    """A 2-layer random Llama with the real 49152-token tokenizer, saved as a local model folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), real_model_dir)


def save_tiny_llama(out: Path, real_model_dir: Path, hidden_size: int = 32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(real_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    # a larger init spreads the teacher's distribution so top-k and residual are both non-trivial
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def corpora(tmp_path) -> dict:
    return {"med": write_jsonl(tmp_path / "med.jsonl", MED), "gen": write_jsonl(tmp_path / "gen.jsonl", GEN)}


def tiny_config(model_dir: Path, corpora: dict, cache_root: Path, **over) -> dict:
    """A config dict for load_config(data=...)."""
    cfg = {
        "model": {"name": str(model_dir)},
        "data": {"max_seq_len": 48, "val_fraction": 0.2, "sources": [
            {"path": str(corpora["med"]), "corpus": "domain", "subset": "med"},
            {"path": str(corpora["gen"]), "corpus": "general", "subset": "gen"},
        ]},
        "teacher": {"top_k": 5, "batch_size": 3, "rows_per_shard": 4, "cache_root": str(cache_root),
                    "fidelity_sequences": 1},
    }
    for k, v in over.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.fixture
def built(tiny_model_dir, corpora, tmp_path):
    """A freshly built cache of the tiny model on `corpora` (per test: tests corrupt it) and its config."""
    cfg = load_config(data=tiny_config(tiny_model_dir, corpora, tmp_path / "caches"))
    cache_dir, status = run_teacher_pass(cfg)
    assert status == "built"
    return cfg, cache_dir


def alias_bomb(indent: str = "    ") -> str:
    """YAML mapping lines (at `indent`) of nine levels of nine aliases each: a few hundred bytes that
    expand to 9^9 ones and the lists around them."""
    levels = [f"{indent}a: &a [{', '.join(['1'] * 9)}]"] + [
        f"{indent}{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    return "\n".join(levels) + "\n"


def cache_units(cache_dir: Path) -> list[Path]:
    """The unit folders of a config's cache, in config order."""
    return [u.path for u in C.TeacherCache(cache_dir).units]


def cache_shards(cache_dir: Path) -> list[Path]:
    """Every shard of a config's cache (its set folder), units in order."""
    m = json.loads((Path(cache_dir) / "manifest.json").read_text())
    root = Path(cache_dir).parent.parent
    return [p for u in m["units"] for p in sorted((root / u["dir"]).glob("shard-*.parquet"))]


def assert_sqrt_grid(decoded, exact):
    """A code of round(1023 sqrt(p)) is within half a step of sqrt(p): |Δp| <= sqrt(p)/1023 + 1/1023²."""
    bound = np.sqrt(exact) / C.PROB_LEVELS + 1.0 / C.PROB_LEVELS ** 2 + 1e-7
    assert (np.abs(decoded.astype(np.float64) - exact) <= bound).all()


def metrics_records(run_dir: Path) -> list[dict]:
    """A run folder's metrics.jsonl as records (blank lines skipped)."""
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="session")
def small(tiny_model_dir, tmp_path_factory) -> dict:
    """The fault suite's reference cache and its config (tests/faults_kit.py): built once for the
    test_faults_* files, which only read it or copy it."""
    from faults_kit import build_small

    return build_small(tiny_model_dir, tmp_path_factory)


def refuse_network(mp: pytest.MonkeyPatch) -> list:
    """Every socket connection attempt is recorded and refused: what must run offline does."""
    import socket

    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"test: no network ({address})")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture
def no_network(monkeypatch) -> list:
    """The connection attempts made while the test ran (all refused)."""
    return refuse_network(monkeypatch)
