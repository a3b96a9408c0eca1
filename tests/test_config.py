"""Recipes and overrides: good input builds a config, bad input names the key."""
from __future__ import annotations

import pytest

from engine.config import Config, ConfigError, load_config, parse_override


def _recipe(tmp_path, text: str):
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


def test_defaults():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.path == "smollm2-135m-instruct" and cfg.generate.temperature == 0.0


def test_recipe_and_overrides(tmp_path):
    path = _recipe(tmp_path, '[model]\npath = "/ckpt"\n[generate]\ntemperature = 0.7\nmax_new_tokens = 64\n')
    cfg = load_config(path, ["--generate.max_new_tokens=128", "--model.path=/other/dir", "--generate.top_p=1"])
    assert cfg.model.path == "/other/dir"
    assert cfg.generate.temperature == 0.7 and cfg.generate.max_new_tokens == 128
    assert cfg.generate.top_p == 1.0 and isinstance(cfg.generate.top_p, float)


def test_override_values_are_toml():
    assert parse_override("--a.b=0.28") == (["a", "b"], 0.28)
    assert parse_override("--a.b=true") == (["a", "b"], True)
    assert parse_override('--a.b="3"') == (["a", "b"], "3")
    assert parse_override("--a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("--a.b=some/path") == (["a", "b"], "some/path")
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        parse_override("--a.b")


def test_unknown_key_in_recipe(tmp_path):
    path = _recipe(tmp_path, "[generate]\ntemprature = 0.7\n")
    with pytest.raises(ConfigError, match=r"r\.toml: unknown key generate\.'temprature'.*temperature"):
        load_config(path)


def test_unknown_section_override():
    with pytest.raises(ConfigError, match="unknown key 'ppo'"):
        load_config(None, ["--ppo.clip_high=0.28"])
    assert load_config(None, ["--rl.clip_high=0.3"]).rl.clip_high == 0.3


def test_nested_phase_tables_are_checked(tmp_path):
    path = _recipe(tmp_path, '[rl]\nphases = [{name = "p1", max_input_tokens = 20000, steps = 2}, '
                             '{name = "p2", max_input_tokens = 60000, steps = 0}]\n')
    with pytest.raises(ConfigError, match=r"rl\.phases\[1\]\.max_input_tokens / steps"):
        load_config(path)
    path = _recipe(tmp_path, '[rl]\nphases = [{name = "p1", max_input_tokens = 60000, steps = 2}, '
                             '{name = "p2", max_input_tokens = 20000, steps = 2}]\n')
    with pytest.raises(ConfigError, match="increasing max_input_tokens"):
        load_config(path)


def test_wrong_type_in_recipe(tmp_path):
    path = _recipe(tmp_path, '[generate]\nmax_new_tokens = "many"\n')
    with pytest.raises(ConfigError, match=r"r\.toml: generate\.max_new_tokens: expected an integer, got 'many'"):
        load_config(path)
    path = _recipe(tmp_path, "[model]\nactivation_checkpointing = 1\n")
    with pytest.raises(ConfigError, match="expected true or false"):
        load_config(path)


def test_choice_and_impossible_values():
    with pytest.raises(ConfigError, match=r"model\.dtype: expected one of 'auto', 'float32'"):
        load_config(None, ["--model.dtype=float64"])
    with pytest.raises(ConfigError, match=r"generate\.top_p: expected a number in \(0, 1\], got 1\.5"):
        load_config(None, ["--generate.top_p=1.5"])
    with pytest.raises(ConfigError, match="temperature: expected a number >= 0"):
        load_config(None, ["--generate.temperature=-1"])
    with pytest.raises(ConfigError, match="device: expected auto, cpu or cuda"):
        load_config(None, ["--model.device=tpu"])


def test_section_must_be_a_table(tmp_path):
    path = _recipe(tmp_path, "generate = 3\n")
    with pytest.raises(ConfigError, match="generate: expected a table"):
        load_config(path)


def test_missing_or_broken_recipe(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_recipe(tmp_path, "[model\n"))
