from pathlib import Path

import pytest

from mol.config import ConfigError, MolConfig, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for f in (ROOT / "data").glob("*.yaml"):
        cfg = load_config(f)
        assert isinstance(cfg, MolConfig)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(data={
            "model": {"name": "x", "colour": "red"},
            "data": {"max_seq_len": 1, "sources": [{"path": "a", "corpus": "medical", "subset": "s"}]},
            "teacher": {"top_k": "31"},
            "train": {"alpha": 1.5, "general_ratio": 0, "lora": {"target_modules": ["lm_head"]}},
        })
    msg = "\n".join(e.value.problems)
    for needle in ("colour: unknown key", "top_k: expected an integer", "max_seq_len must be >= 2",
                   "corpus 'medical'", "alpha must be in [0, 1]", "general_ratio must be > 0", "output layer"):
        assert needle in msg, (needle, msg)


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(ROOT / "data/default.yaml", ["train.alpha=0.5", "train.lr=3e-4", "data.sources.0.max_records=7",
                                                   "model.chat_template_kwargs={enable_thinking: false}"])
    assert cfg.train.alpha == 0.5 and cfg.train.lr == 3e-4
    assert cfg.data.sources[0].max_records == 7
    assert cfg.model.chat_template_kwargs == {"enable_thinking": False}
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_bad_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ROOT / "data/default.yaml", ["train.alpha"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def test_config_file_and_override_mistakes_name_the_place(tmp_path):
    """Each is one problem naming the file (and line) or the override; tests/test_cli_errors.py runs
    the same mistakes through the entry points."""
    (tmp_path / "bad.yaml").write_text("model:\n  name: [x\n")
    (tmp_path / "latin1.yaml").write_bytes(b"model:\n  name: caf\xe9\n")
    for path, needle in ((tmp_path, "is a folder"), (tmp_path / "bad.yaml", "bad.yaml: YAML syntax error at line 3"),
                         (tmp_path / "latin1.yaml", "not UTF-8 text (byte 0xe9 on line 2)")):
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert len(e.value.problems) == 1 and needle in e.value.problems[0], e.value.problems
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "data/default.yaml", ["train.lr", "train.lr=[1,", "train..lr=1", "model.name.x=1",
                                                  "train=5", "train.alpha=1", "data.sources.4.path=x"])
    p = e.value.problems
    assert p[0] == "override 'train.lr' is not of the form key=value", p
    assert "'[1,' is not a YAML value" in p[1] and "not a dotted key" in p[2], p
    assert "model.name is 'smollm2-135m-instruct', not a mapping" in p[3], p
    assert "train is 5, not a mapping with a key 'alpha'" in p[4], p
    assert "data.sources is a list of 4 items; '4' is not one of its indexes 0..3" in p[5], p


def _numeric_fields(cls=MolConfig, prefix=""):
    """Every int/float field of the config tree as (dotted key, type), sources through index 0."""
    import dataclasses
    import typing

    from mol.config import SourceConfig

    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(inner[0]):
            out += _numeric_fields(inner[0], key + ".")
        elif typing.get_origin(tp) is list and typing.get_args(tp)[0] is SourceConfig:
            out += _numeric_fields(SourceConfig, key + ".0.")
        elif inner[0] in (int, float):
            out.append((key, inner[0]))
    return out


def test_every_numeric_field_rejects_non_finite_and_impossible_values():
    fields = _numeric_fields()
    assert len(fields) >= 40  # the walk found the tree, not a stub
    accepted = []
    for key, tp in fields:
        bad = [".nan", ".inf", "-.inf", "-1"] + (["1e400"] if tp is float else ["0.5"])
        for value in bad:
            try:
                load_config(ROOT / "data/default.yaml", [f"{key}={value}"])
            except ConfigError as e:
                named = key.replace(".0.", "[0].") if ".0." in key else key
                assert any(named.split(".")[-1] in p and named.split(".")[0] in p for p in e.problems), (key, e.problems)
            else:
                accepted.append(f"{key}={value}")
    assert not accepted, accepted


@pytest.mark.parametrize("overrides,needle", [
    (["data.val_fraction=0"], "data.val_fraction must be > 0"),
    (["data.max_val_sequences=0", "data.sources.3.max_val_sequences=0"], "no validation sequences"),
    ([f"data.sources.{i}.max_val_sequences=0" for i in range(4)], "no validation sequences"),
    (["train.resume=true"], "train.resume=true needs train.run_name"),
    (["train.run_name=../elsewhere"], "train.run_name"),
    (["train.run_name=/tmp/x"], "train.run_name"),
    (["train.run_name=a/b"], "train.run_name"),
    (["train.run_name=.."], "train.run_name"),
    (["train.run_name="], "train.run_name"),
    (["model.device=gpu"], "model.device"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["eval.mcq_sets=[../medqa]"], "eval.mcq_sets"),
    (["eval.tasks=['']"], "eval.tasks"),
    (["eval.gen_kwargs={temperature: .nan}"], "eval.gen_kwargs.temperature"),
    (["eval.gen_kwargs={top_k: {a: 1}}"], "eval.gen_kwargs.top_k"),
])
def test_settings_that_guarantee_a_later_failure_are_rejected(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "data/default.yaml", overrides)
    assert any(needle in p for p in e.value.problems), e.value.problems
