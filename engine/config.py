"""Configs: dataclasses, TOML recipes, dotted command-line overrides, validation.

A recipe is a TOML file whose tables match the sections below:

    [model]
    path = "smollm2-135m-instruct"
    [generate]
    temperature = 0.7

and any key can be overridden on the command line as `--generate.temperature=0.7`.
Unknown keys, values of the wrong type and impossible values are rejected with a message
that names the key, where it came from, and what was expected.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A recipe or override is wrong; the message says which key and why."""


# ---- sections ----------------------------------------------------------------------
@dataclass
class ModelConfig:
    path: str = "smollm2-135m-instruct"  # embedded name, checkpoint directory or .gguf file
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 on CPU, bf16 on GPU
    device: str = "auto"  # auto: cuda when available, else cpu
    attn_backend: Literal["auto", "sdpa", "flash_attn"] = "auto"
    activation_checkpointing: bool = False

    def validate(self, key: str) -> None:
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"{key}.device: expected auto, cpu or cuda[:N], got {self.device!r}")


@dataclass
class GenerateConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 0
    batch_size: int = 4  # prompts generated together

    def validate(self, key: str) -> None:
        _check(self.max_new_tokens >= 1, f"{key}.max_new_tokens", "an integer >= 1", self.max_new_tokens)
        _check(self.temperature >= 0, f"{key}.temperature", "a number >= 0 (0 = greedy)", self.temperature)
        _check(0 < self.top_p <= 1, f"{key}.top_p", "a number in (0, 1]", self.top_p)
        _check(self.top_k >= 0, f"{key}.top_k", "an integer >= 0 (0 = off)", self.top_k)
        _check(self.batch_size >= 1, f"{key}.batch_size", "an integer >= 1", self.batch_size)


@dataclass
class DataConfig:
    template: str = "qwenlong"  # a name in engine.data.template.TEMPLATES
    # longest prompt in tokens; longer documents lose their middle. 0: the model's context
    # length minus generate.max_new_tokens
    max_input_tokens: int = 0
    chat_template: bool = True  # wrap the prompt with the tokenizer's chat template

    def validate(self, key: str) -> None:
        _check(self.max_input_tokens >= 0, f"{key}.max_input_tokens", "an integer >= 0", self.max_input_tokens)


@dataclass
class EvalConfig:
    """`longrl eval` settings; defaults as QwenLong-L1 evaluates (zero-shot template, 120K
    input, up to 10K new tokens, temperature 0.7, top-p 0.95, one sample)."""
    max_input_tokens: int = 120_000  # further bounded by the model's context minus max_new_tokens
    max_new_tokens: int = 10_000
    temperature: float = 0.7
    top_p: float = 0.95
    n: int = 1  # samples per item
    k: list[int] = field(default_factory=lambda: [1])  # pass@k for each k (k <= n)
    template: str = "qwenlong"
    think: Literal["auto", "required", "off"] = "auto"
    seed: int = 0
    batch_items: int = 8  # items generated together
    limit: int = 0  # items per benchmark (0: all)
    # held-out sets scored during `longrl train`: before training, after SFT, after each RL
    # phase, and every `every` RL steps (0: only at those points)
    sets: list[str] = field(default_factory=list)
    every: int = 0

    def validate(self, key: str) -> None:
        _check(self.n >= 1, f"{key}.n", "an integer >= 1", self.n)
        _check(bool(self.k) and all(1 <= k <= self.n for k in self.k), f"{key}.k",
               f"a non-empty list of integers in 1..n (n = {self.n})", self.k)
        _check(self.max_new_tokens >= 1 and self.max_input_tokens >= 1, f"{key}.max_new_tokens / max_input_tokens",
               "integers >= 1", (self.max_new_tokens, self.max_input_tokens))
        _check(self.temperature >= 0, f"{key}.temperature", "a number >= 0", self.temperature)
        _check(0 < self.top_p <= 1, f"{key}.top_p", "a number in (0, 1]", self.top_p)
        _check(self.batch_items >= 1 and self.limit >= 0, f"{key}.batch_items / limit", "batch_items >= 1, limit >= 0",
               (self.batch_items, self.limit))


@dataclass
class TrainConfig:
    """Optimizer, schedule, micro-batching and checkpoints (shared by every stage)."""
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["constant", "warmup", "cosine"] = "constant"  # warmup: linear ramp then constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0: off
    token_budget: int = 4096  # tokens per micro-batch (packed, no padding)
    seed: int = 0
    out_dir: str = "runs/longrl"
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 2  # checkpoints kept
    max_bad_steps: int = 3  # non-finite losses in a row before the run stops
    peak_tflops: float = 0.0  # the device's dense matmul peak, for the MFU metric (0: no MFU)

    def validate(self, key: str) -> None:
        _check(self.lr > 0, f"{key}.lr", "a number > 0", self.lr)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{key}.betas",
               "two numbers in [0, 1)", self.betas)
        _check(self.token_budget >= 1 and self.keep_last >= 1 and self.max_bad_steps >= 1,
               f"{key}.token_budget / keep_last / max_bad_steps", "integers >= 1",
               (self.token_budget, self.keep_last, self.max_bad_steps))
        _check(self.warmup_steps >= 0 and self.save_every >= 0 and self.grad_clip >= 0,
               f"{key}.warmup_steps / save_every / grad_clip", "values >= 0",
               (self.warmup_steps, self.save_every, self.grad_clip))


@dataclass
class SFTConfig:
    """Warm-up SFT on (document, question, answer): the loss covers the answer tokens only."""
    data: list[str] = field(default_factory=list)  # doc-QA files (any layout load_docqa reads)
    format: str = "auto"
    epochs: int = 1
    max_steps: int = 0  # 0: as many as `epochs` take
    batch_examples: int = 8  # examples per optimizer step, split into micro-batches by token_budget
    max_input_tokens: int = 0  # 0: the model's context minus 64 tokens for the answer

    def validate(self, key: str) -> None:
        _check(self.epochs >= 1 and self.batch_examples >= 1 and self.max_steps >= 0, f"{key}.epochs / "
               f"batch_examples / max_steps", "epochs, batch_examples >= 1 and max_steps >= 0",
               (self.epochs, self.batch_examples, self.max_steps))


@dataclass
class PhaseConfig:
    """One RL phase of the curriculum: examples with input length in (previous max, max]."""
    name: str = "phase"
    max_input_tokens: int = 20_000
    steps: int = 1

    def validate(self, key: str) -> None:
        _check(self.max_input_tokens >= 1 and self.steps >= 1, f"{key}.max_input_tokens / steps",
               "integers >= 1", (self.max_input_tokens, self.steps))


@dataclass
class RLConfig:
    """GRPO / DAPO with curriculum phases, retrospective sampling and the hybrid reward."""
    data: list[str] = field(default_factory=list)
    format: str = "auto"
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    group_size: int = 8  # samples per prompt (G)
    batch_prompts: int = 8  # groups per rollout batch
    mini_batches: int = 1  # optimizer steps per rollout batch (1: strictly on-policy, no old log-probs)
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float | None = None
    kl_coef: float = 0.0
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                         "seq-mean-token-sum-norm"] = "token-mean"
    advantage_scale: Literal["group", "batch", "none"] = "group"
    dynamic_sampling: bool = True
    max_rounds: int = 3  # generation rounds to fill a batch with groups of non-zero variance
    on_shortfall: Literal["log", "error"] = "log"
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last N tokens; 0: off
    overlong_factor: float = 1.0
    overlong_filter: bool = False  # truncated samples leave the loss
    carry_ratio: float = 0.25  # share of each later phase's batch drawn from carried hard examples
    carry_threshold: float = 0.0  # examples at or below this mean reward are carried (paper: 0)
    difficulty_cap: float = 10.0
    think: Literal["auto", "required", "off"] = "auto"
    lr: float = 0.0  # RL learning rate; 0: train.lr

    def validate(self, key: str) -> None:
        _check(self.lr >= 0, f"{key}.lr", "a number >= 0 (0: train.lr)", self.lr)
        _check(self.group_size >= 2, f"{key}.group_size", "an integer >= 2 (GRPO needs a group)", self.group_size)
        _check(self.batch_prompts >= 1 and 1 <= self.mini_batches <= self.batch_prompts,
               f"{key}.batch_prompts / mini_batches", "1 <= mini_batches <= batch_prompts",
               (self.batch_prompts, self.mini_batches))
        _check(self.max_new_tokens >= 1 and 0 <= self.overlong_buffer <= self.max_new_tokens,
               f"{key}.overlong_buffer", "0..max_new_tokens", self.overlong_buffer)
        _check(0 <= self.carry_ratio < 1, f"{key}.carry_ratio", "a number in [0, 1)", self.carry_ratio)
        lengths = [p.max_input_tokens for p in self.phases]
        _check(bool(lengths) and lengths == sorted(set(lengths)), f"{key}.phases",
               "phases with increasing max_input_tokens", lengths)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


# ---- building from dicts -----------------------------------------------------------
def from_dict(cls: type, data: dict[str, Any], prefix: str = "", source: str = "config"):
    """Build dataclass `cls` from a nested dict, checking keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {prefix}{key!r}; valid keys here: {', '.join(fields)}")
    values = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = from_dict(tp, value, f"{prefix}{name}.", source)
        else:
            values[name] = _coerce(value, tp, f"{prefix}{name}", source)
    obj = cls(**values)
    for name in fields:
        sub = getattr(obj, name)
        if dataclasses.is_dataclass(sub) and hasattr(sub, "validate"):
            try:
                sub.validate(f"{prefix}{name}")
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
    return obj


def _type_name(tp) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str, source: str):
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        errors = []
        for arm in get_args(tp):
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{source}: {key}: expected {' or '.join(_type_name(a) for a in get_args(tp))}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        (item,) = get_args(tp) or (Any,)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        obj = from_dict(tp, value, f"{key}.", source)
        if hasattr(obj, "validate"):
            try:
                obj.validate(key)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
        return obj
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported config type {tp!r}")


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# ---- recipes and overrides ---------------------------------------------------------
def parse_override(arg: str) -> tuple[list[str], Any]:
    """'--generate.temperature=0.7' -> (['generate', 'temperature'], 0.7).

    The value is read as a TOML value when it is one (numbers, true/false, quoted strings,
    [lists]); anything else is taken as a bare string, so --model.path=/x/y works unquoted."""
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body:
        raise ConfigError(f"override {arg!r}: expected --section.key=value")
    key, raw = body.split("=", 1)
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {arg!r}: malformed key {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def load_config(recipe: str | Path | None = None, overrides: list[str] = (), cls: type = Config):
    """A recipe file (or none: defaults) plus dotted overrides -> a validated config."""
    data: dict[str, Any] = {}
    source = "defaults"
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe {path}: no such file")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"recipe {path}: not valid TOML ({e})") from None
        source = str(path)
        from_dict(cls, data, source=source)  # report recipe errors against the recipe itself
    for arg in overrides:
        parts, value = parse_override(arg)
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {arg!r}: {part!r} is not a section")
        node[parts[-1]] = value
    if overrides:
        source = f"{source} + command-line overrides"
    return from_dict(cls, data, source=source)
