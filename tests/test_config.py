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
    # refused at load, not after a stage has run (the loss, the sampler and the loaders refuse
    # them too, but only when they are reached)
    for override, message in [("--rl.clip_c=0.5", r"rl\.clip_c: expected a number > 1"),
                              ("--rl.temperature=0", r"rl\.temperature: expected a number > 0"),
                              ("--rl.top_p=2", r"rl\.top_p: expected a number in \(0, 1\]"),
                              ("--rl.clip_low=-1", r"rl\.clip_low / clip_high"),
                              ("--train.min_lr_ratio=5", r"train\.min_lr_ratio: expected a number in \[0, 1\]"),
                              ("--train.weight_decay=-1", r"train\.weight_decay"),
                              ("--eval.every=-1", r"eval\.every"),
                              ("--sft.max_input_tokens=-3", r"sft\.max_input_tokens"),
                              ("--data.template='qwenlng'", r"data\.template: expected one of qwenlong"),
                              ("--sft.format='csv'", r"sft\.format: expected auto or one of docqa"),
                              ("--rl.format='x'", r"rl\.format"),
                              ("--rl.phases=[{max_input_tokens=20}, {max_input_tokens=40}]",
                               r"rl\.phases: expected a different name for each phase")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


def test_section_must_be_a_table(tmp_path):
    path = _recipe(tmp_path, "generate = 3\n")
    with pytest.raises(ConfigError, match="generate: expected a table"):
        load_config(path)


def test_missing_or_broken_recipe(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_recipe(tmp_path, "[model\n"))
    bom = tmp_path / "bom.toml"  # saved with a byte-order mark, as some editors do
    bom.write_bytes(b"\xef\xbb\xbf[train]\nlr = 0.5\n")
    assert load_config(bom).train.lr == 0.5
    (tmp_path / "latin.toml").write_bytes(b"[train]\nout_dir = 'caf\xe9'\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "latin.toml")


# ---- every key reaches the code; recipes validate at load ------------------------------
def _config_keys(cls=Config, prefix=""):
    """(dotted key, field name) of every leaf key of the config tree."""
    import dataclasses
    import typing

    from engine.config import PhaseConfig

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _config_keys(tp, f"{prefix}{f.name}.")
        elif typing.get_args(tp) == (PhaseConfig,):
            yield from _config_keys(PhaseConfig, f"{prefix}{f.name}[].")
        else:
            yield f"{prefix}{f.name}", f.name


def _unread_keys(cls=Config) -> list[str]:
    """Leaf keys that no engine code outside config.py reads as an attribute (`.name`);
    config.py's own helpers that turn keys into engine objects (cache_config, resolved) count."""
    import re
    from pathlib import Path

    import engine

    root = Path(engine.__file__).parent
    sources = "\n".join(p.read_text() for p in root.rglob("*.py") if p.name != "config.py")
    helpers = "\n".join(re.findall(r"    def (?:cache_config|resolved)\(self.*?(?=\n\n|\Z)",
                                   (root / "config.py").read_text(), re.S))
    return [key for key, name in _config_keys(cls)
            if not re.search(rf"\.{name}\b", sources) and not re.search(rf"self\.{name}\b", helpers)]


def test_every_config_key_is_read_somewhere():
    """A key that nothing reads is a setting that silently does nothing."""
    assert _unread_keys() == []


def test_the_key_walk_sees_an_unread_key():
    import dataclasses

    @dataclasses.dataclass
    class Extra:
        a_setting_nobody_reads: int = 0

    extended = dataclasses.make_dataclass("Config", [("extra", Extra, dataclasses.field(default_factory=Extra))],
                                          bases=(Config,))
    assert _unread_keys(extended) == ["extra.a_setting_nobody_reads"]


def _rl_recipe(tmp_path, extra: str = "", budget: int = 4096, phases=(512, 1024), new_tokens: int = 256):
    plist = ", ".join(f'{{ name = "p{i}", max_input_tokens = {n}, steps = 1 }}' for i, n in enumerate(phases))
    return _recipe(tmp_path, f'[train]\ntoken_budget = {budget}\n[rl]\ndata = ["x.jsonl"]\nphases = [{plist}]\n'
                             f'max_new_tokens = {new_tokens}\n{extra}')


def test_token_budget_must_hold_the_longest_rl_sequence(tmp_path):
    load_config(_rl_recipe(tmp_path, budget=1280, phases=(512, 1024)))  # 1024 + 256 fits exactly
    with pytest.raises(ConfigError, match=r"train\.token_budget: expected at least the longest RL sequence, 1280"):
        load_config(_rl_recipe(tmp_path, budget=1279, phases=(512, 1024)))
    with pytest.raises(ConfigError, match="train.token_budget"):
        load_config(_rl_recipe(tmp_path, budget=4096), ["--rl.max_new_tokens=4000"])


def test_phases_must_ascend(tmp_path):
    with pytest.raises(ConfigError, match=r"rl\.phases: expected phases with increasing max_input_tokens"):
        load_config(_rl_recipe(tmp_path, phases=(1024, 512)))


def test_judge_keys_need_a_judge(tmp_path):
    with pytest.raises(ConfigError, match=r"reward\.judge: expected 'http' or 'local' when judge_url is set"):
        load_config(None, ["--reward.judge_url=http://127.0.0.1:9/v1"])
    with pytest.raises(ConfigError, match="judge_key_env"):
        load_config(None, ["--reward.judge_key_env=MY_KEY"])
    with pytest.raises(ConfigError, match=r"reward\.judge_url / judge_model"):
        load_config(None, ["--reward.judge=http", "--reward.judge_url=http://127.0.0.1:9/v1"])
    with pytest.raises(ConfigError, match=r"reward\.judge_path"):
        load_config(None, ["--reward.judge=local"])
    cfg = load_config(None, ["--reward.judge=http", "--reward.judge_url=http://127.0.0.1:9/v1",
                             "--reward.judge_model=j", "--reward.judge_key_env=MY_KEY"])
    assert cfg.reward.judge == "http" and cfg.reward.judge_key_env == "MY_KEY"


def test_new_sections_check_their_values():
    for override, key in [("--rollout.block_size=24", "rollout.block_size"),
                          ("--rollout.block_size=8", "rollout.block_size"),
                          ("--rollout.block_size=512", "rollout.block_size"),
                          ("--rollout.gpu_memory_fraction=1.5", "rollout.gpu_memory_fraction"),
                          ("--rollout.lookahead=always", "rollout.lookahead"),
                          ("--kernels.chunk_mb=-1", "kernels.chunk_mb"),
                          ("--kernels.backend=cuda", "kernels.backend"),
                          ("--rl.aepo_low=0.5", "rl.aepo_low"),
                          ("--rl.oversample=0", "rl.oversample"),
                          ("--rl.on_shortfall=drop", "rl.on_shortfall"),
                          ("--reward.judge_tasks=[\"essay\"]", "reward.judge_tasks")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])


def test_rollout_section_reaches_the_cache_config():
    cfg = load_config(None, ["--rollout.lookahead=off", "--rollout.cuda_graphs=eager"])
    cache = cfg.rollout.cache_config()
    assert (cache.lookahead, cache.cuda_graphs) == ("off", "eager")


def test_shipped_recipes_validate():
    from pathlib import Path
    for recipe in sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.toml")):
        cfg = load_config(recipe)
        assert cfg.train.token_budget >= max(p.max_input_tokens for p in cfg.rl.phases) + cfg.rl.max_new_tokens


def test_a_recipe_may_leave_keys_to_the_command_line(tmp_path):
    path = _recipe(tmp_path, '[reward]\njudge = "http"\njudge_model = "j"\n')
    with pytest.raises(ConfigError, match=r"r\.toml: reward\.judge_url / judge_model"):
        load_config(path)
    cfg = load_config(path, ["--reward.judge_url=http://127.0.0.1:9/v1"])
    assert cfg.reward.judge_url == "http://127.0.0.1:9/v1"
    with pytest.raises(ConfigError, match=r"r\.toml \+ command-line overrides: unknown key reward\.'judge_ur'"):
        load_config(path, ["--reward.judge_ur=http://127.0.0.1:9/v1"])
