"""Locating the model: a name that is neither the built-in default, a folder nor a reachable hub id
is a user's mistake with a message saying so, never a network traceback. No test here needs the
network: the hub is put offline, or the name never reaches it."""

import pytest

from mol.errors import MolError
from mol.model import DEFAULT_MODEL, ModelError, load_tokenizer, resolve_model_path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The hub as on a machine without network, with an empty cache. huggingface_hub reads its
    environment once, on import: the constants are what it looks at later."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.fixture
def no_hub(monkeypatch):
    """Any hub look-up fails the test."""
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError(f"snapshot_download called with {a} {k}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def _missing(name: str) -> str:
    return (f"model {name!r}: no such local folder or hub id (the built-in default is {DEFAULT_MODEL!r}; "
            f"a folder needs config.json; hub: ")


@pytest.mark.parametrize("name", ["smollm2-135m-instruc", "HuggingFaceTB/SmolLM2-135M-Instruc"])
def test_a_typo_is_no_such_folder_or_hub_id(offline, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # a relative name is looked up as a folder here first
    with pytest.raises(ModelError) as e:
        resolve_model_path(name)
    msg = str(e.value)
    assert msg.startswith(_missing(name)) and msg.endswith(")") and "\n" not in msg, msg
    assert "offline" in msg, msg
    assert isinstance(e.value, MolError) and isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize("name, reason", [
    ("my model", "not a valid hub id"),
    ("foo/bar/baz", "not a valid hub id"),
    ("org/a..b", "not a valid hub id"),
    ("-dash", "not a valid hub id"),
])
def test_a_name_that_cannot_be_a_hub_id_never_reaches_the_hub(no_hub, tmp_path, monkeypatch, name, reason):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as e:
        resolve_model_path(name)
    assert str(e.value).startswith(_missing(name) + reason), str(e.value)


def test_local_folders(no_hub, tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match=r"model folder .*/m has no config.json"):
        resolve_model_path(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path / "m")) == tmp_path / "m"
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="is not a folder with a causal LM"):
        resolve_model_path(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelError, match="is not a folder with a causal LM"):
        resolve_model_path(str(tmp_path / "absent"))


def test_a_tokenizer_without_eos_is_a_model_error(real_model_dir, tmp_path):
    tok = load_tokenizer(real_model_dir)
    tok.eos_token = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="has no eos token"):
        load_tokenizer(tmp_path)
