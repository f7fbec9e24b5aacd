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
