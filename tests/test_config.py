from pathlib import Path

import pytest

from conftest import alias_bomb
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


def _sources(*entries) -> dict:
    return {"data": {"sources": [dict(zip(("path", "corpus", "subset", "heldout"), e)) for e in entries]}}


def test_a_heldout_file_that_also_feeds_training_is_refused_however_it_is_spelled(tmp_path):
    (tmp_path / "heldout").mkdir()
    held = tmp_path / "heldout" / "x.jsonl"
    held.write_text('{"text": "a"}\n')
    (tmp_path / "link.jsonl").symlink_to(held)
    spellings = [str(held), str(tmp_path / "heldout" / ".." / "heldout" / "x.jsonl"), str(tmp_path / "link.jsonl")]
    for train_path in spellings:
        for subset in ("other", "unseen"):  # another subset name, or the same one
            with pytest.raises(ConfigError) as e:
                load_config(data=_sources((str(held), "general", "unseen", True), (train_path, "general", subset, False)))
            assert any("data.sources[0] (heldout: true) and data.sources[1] read the same file" in p
                       and "must not feed training" in p for p in e.value.problems), (train_path, subset, e.value.problems)
    # the held-out source listed second is named as such too
    with pytest.raises(ConfigError, match=r"data.sources\[1\] \(heldout: true\) and data.sources\[0\]"):
        load_config(data=_sources((spellings[1], "domain", "a", False), (str(held), "general", "unseen", True)))
    # the duplicate check reads real paths too; one file under two training subsets stays allowed
    with pytest.raises(ConfigError, match=r"duplicate source .* \(data.sources\[0\] reads the same file\)"):
        load_config(data=_sources((str(held), "general", "g", False), (spellings[1], "general", "g", False)))
    load_config(data=_sources((str(held), "general", "g", False), (spellings[2], "general", "h", False)))


def test_a_yaml_alias_bomb_is_refused_naming_its_key_without_expanding_it(tmp_path):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("model:\n  name: x\n  chat_template_kwargs:\n" + alias_bomb())
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    (msg,) = e.value.problems
    # 9 levels of 9 aliases each: 9^9 ones and the lists around them
    assert msg.startswith("model.chat_template_kwargs.g: YAML aliases here expand the config to 4"), msg
    assert int(msg.split(" to ")[1].split(" values")[0].replace(",", "")) > 9 ** 9, msg
    cyc = tmp_path / "cycle.yaml"
    cyc.write_text("model:\n  name: x\n  chat_template_kwargs: &a {x: *a}\n")
    with pytest.raises(ConfigError, match=r"model.chat_template_kwargs.x: a YAML alias refers to a value that contains it"):
        load_config(cyc)
    # an override is a YAML value too
    with pytest.raises(ConfigError, match="YAML aliases here expand the config"):
        load_config(data={}, overrides=["model.chat_template_kwargs={a: &a [1,1,1,1,1,1,1,1,1,1], "
                                        + ", ".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]" for p, c in
                                                    zip("abcde", "bcdef")) + "}"])
    # aliases that stay small are fine
    ok = tmp_path / "ok.yaml"
    ok.write_text("model:\n  name: x\n  chat_template_kwargs: {a: &a [1, 2], b: *a}\n")
    assert load_config(ok, data=_sources((str(tmp_path / "x.jsonl"), "domain", "a", False))).model.chat_template_kwargs == {"a": [1, 2], "b": [1, 2]}


def test_a_path_name_over_255_bytes_or_a_fifo_is_one_error_line_per_setting(tmp_path):
    import os

    long = "x" * 256
    fifo = tmp_path / "corpus.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as e:
        load_config(data={"model": {"name": str(tmp_path / long)},
                          "data": {"sources": [{"path": f"{tmp_path}/{long}.jsonl", "corpus": "domain", "subset": "a"},
                                               {"path": str(fifo), "corpus": "general", "subset": "b"}]},
                          "teacher": {"cache_root": f"{tmp_path}/{long}/c"},
                          "train": {"out_dir": f"{tmp_path}/{long}", "run_name": long, "cache_dir": f"/{long}"}})
    probs = e.value.problems
    for what in ("model.name", "data.sources[0]: path", "teacher.cache_root", "train.out_dir", "train.cache_dir"):
        assert any(p.startswith(f"{what}: a name in it is ") and "over the 255 a file system allows" in p
                   for p in probs), (what, probs)
    assert "train.run_name is 256 bytes long, over the 255 a file system allows for one folder name" in probs
    assert f"data.sources[1]: path: {fifo} is a FIFO, not a file or a folder" in probs
    # 255 bytes is allowed: the limit is the file system's
    load_config(data={"train": {"run_name": "y" * 255}, **_sources((str(tmp_path / ("z" * 250)), "domain", "a", False))})
