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
    # `longrl generate`'s longest prompt in tokens; longer documents lose their middle. 0 (and at
    # most): the model's context length minus generate.max_new_tokens. eval, SFT and the RL
    # phases have their own (eval.max_input_tokens, sft.max_input_tokens, phases' max_input_tokens)
    max_input_tokens: int = 0
    chat_template: bool = True  # wrap the prompt with the tokenizer's chat template

    def validate(self, key: str) -> None:
        from .data.template import TEMPLATES
        _check(self.max_input_tokens >= 0, f"{key}.max_input_tokens", "an integer >= 0", self.max_input_tokens)
        _check(self.template in TEMPLATES, f"{key}.template", f"one of {', '.join(TEMPLATES)}", self.template)


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
    think: Literal["auto", "required", "off"] = "auto"  # auto: required when the chat template opens <think>
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
        _check(self.every >= 0, f"{key}.every", "an integer >= 0 (0: only before and after the stages)", self.every)


def _check_format(value: str, key: str) -> None:
    from .data.loaders import FORMATS
    _check(value == "auto" or value in FORMATS, key, f"auto or one of {', '.join(FORMATS)}", value)


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
    token_budget: int = 4096  # tokens per micro-batch (packed, no padding); >= longest prompt + response
    seed: int = 0
    out_dir: str = "runs/longrl"
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 2  # checkpoints kept
    max_bad_steps: int = 3  # non-finite losses in a row before the run stops
    peak_tflops: float = 0.0  # the device's dense matmul peak, for the MFU metric (0: no MFU)
    # fp32: weights, compute, gradients and optimizer state in fp32. bf16-mixed: fp32 master
    # weights, gradients and optimizer state, bf16 compute (and a bf16 copy that generates).
    # auto: bf16-mixed on CUDA, fp32 on CPU (which has no bf16 matrix units)
    precision: Literal["auto", "fp32", "bf16-mixed"] = "auto"

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
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "a number >= 0", self.weight_decay)
        _check(0 <= self.min_lr_ratio <= 1, f"{key}.min_lr_ratio", "a number in [0, 1]", self.min_lr_ratio)


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
        _check(self.max_input_tokens >= 0, f"{key}.max_input_tokens", "an integer >= 0 (0: the model's window)",
               self.max_input_tokens)
        _check_format(self.format, f"{key}.format")


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
    kl_coef: float = 0.0  # > 0: a frozen copy of the starting weights gives reference log-probs
    # where the reference copy lives between steps ("cpu": host memory; its pass runs on the training device)
    ref_device: Literal["same", "cpu"] = "same"
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                         "seq-mean-token-sum-norm"] = "token-mean"
    advantage_scale: Literal["group", "batch", "none", "task"] = "group"  # task: QwenLong-L1.5's per-task std
    # QwenLong-L1.5 options: AEPO drops negative-advantage samples from the loss while the
    # rollout entropy is above aepo_high, until it falls below aepo_low (0 / 0: off)
    aepo_high: float = 0.0
    aepo_low: float = 0.0
    balance: Literal["none", "task", "data_source"] = "none"  # equal shares per group in each batch
    # DAPO dynamic sampling, as published: groups whose *accuracy* (the unshaped score) is the
    # same for every sample are dropped; each generation batch draws oversample × batch_prompts
    # prompts, up to max_rounds generation batches; then on_shortfall: "log" trains on the short
    # batch with a warning, "skip" logs and skips the update, "error" stops the run
    dynamic_sampling: bool = True
    oversample: int = 1  # generation batch = oversample × batch_prompts (DAPO's recipe: 3)
    max_rounds: int = 3  # generation batches per step at most (DAPO's recipe: 10)
    on_shortfall: Literal["log", "skip", "error"] = "log"
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last N tokens; 0: off
    overlong_factor: float = 1.0
    overlong_filter: bool = False  # truncated samples leave the loss
    # share of each later phase's epoch given to carried hard examples (drawn without
    # replacement, weighted by difficulty, capped at the pool)
    carry_ratio: float = 0.25
    carry_threshold: float = 0.0  # examples at or below this mean reward are carried (paper: 0)
    difficulty_cap: float = 10.0
    think: Literal["auto", "required", "off"] = "auto"  # auto: required when the chat template opens <think>
    lr: float = 0.0  # RL learning rate; 0: train.lr
    # the update's layout: true puts a group's prompt through the model once, as one row
    # [P | R1 … RG] (P + G·R tokens instead of G·(P+R)); false repeats the prompt per sample
    shared_prefix: bool = True
    # truncated importance sampling against rollout/trainer mismatch: the policy-gradient term
    # of each token is weighted by min(exp(trainer − rollout log-prob), tis_cap); 0: off
    tis_cap: float = 0.0

    def validate(self, key: str) -> None:
        _check(self.lr >= 0, f"{key}.lr", "a number >= 0 (0: train.lr)", self.lr)
        _check_format(self.format, f"{key}.format")
        _check(self.temperature > 0, f"{key}.temperature", "a number > 0 (RL samples)", self.temperature)
        _check(0 < self.top_p <= 1, f"{key}.top_p", "a number in (0, 1]", self.top_p)
        _check(0 <= self.clip_low < 1 and self.clip_high >= 0, f"{key}.clip_low / clip_high",
               "0 <= clip_low < 1 and clip_high >= 0", (self.clip_low, self.clip_high))
        _check(self.clip_c is None or self.clip_c > 1, f"{key}.clip_c", "a number > 1 (dual clip; unset: off)",
               self.clip_c)
        _check(self.overlong_factor >= 0 and self.difficulty_cap > 0, f"{key}.overlong_factor / difficulty_cap",
               "overlong_factor >= 0 and difficulty_cap > 0", (self.overlong_factor, self.difficulty_cap))
        _check(self.group_size >= 2, f"{key}.group_size", "an integer >= 2 (GRPO needs a group)", self.group_size)
        _check(self.batch_prompts >= 1 and 1 <= self.mini_batches <= self.batch_prompts,
               f"{key}.batch_prompts / mini_batches", "1 <= mini_batches <= batch_prompts",
               (self.batch_prompts, self.mini_batches))
        _check(self.max_new_tokens >= 1 and 0 <= self.overlong_buffer <= self.max_new_tokens,
               f"{key}.overlong_buffer", "0..max_new_tokens", self.overlong_buffer)
        _check(0 <= self.carry_ratio < 1, f"{key}.carry_ratio", "a number in [0, 1)", self.carry_ratio)
        _check(self.oversample >= 1 and self.max_rounds >= 1, f"{key}.oversample / max_rounds", "integers >= 1",
               (self.oversample, self.max_rounds))
        _check(self.kl_coef >= 0 and self.entropy_coef >= 0, f"{key}.kl_coef / entropy_coef", "numbers >= 0",
               (self.kl_coef, self.entropy_coef))
        _check(0 <= self.aepo_low <= self.aepo_high, f"{key}.aepo_low / aepo_high",
               "0 <= aepo_low <= aepo_high (both 0: AEPO off)", (self.aepo_low, self.aepo_high))
        _check(self.tis_cap >= 0, f"{key}.tis_cap", "a number > 0 (e.g. 2), or 0 for off", self.tis_cap)
        lengths = [p.max_input_tokens for p in self.phases]
        _check(bool(lengths) and lengths == sorted(set(lengths)), f"{key}.phases",
               "phases with increasing max_input_tokens", lengths)
        names = [p.name for p in self.phases]  # they label the metrics, the evaluations and the plots
        _check(len(set(names)) == len(names), f"{key}.phases", "a different name for each phase "
               "(e.g. { name = \"short\", max_input_tokens = 20000, steps = 10 })", names)


@dataclass
class RewardConfig:
    """The hybrid reward max(rule, judge) of training and `longrl eval`. The judge sees the
    question and the two answers, never the document, and is asked only where the rule
    scores below 1."""
    judge: Literal["none", "http", "local"] = "none"
    judge_url: str = ""  # http: an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    judge_model: str = ""  # http: the served model's name
    judge_key_env: str = "OPENAI_API_KEY"  # http: the variable holding the key (read, never logged)
    judge_path: str = ""  # local: a checkpoint directory, .gguf file or embedded model name
    judge_timeout_s: float = 30.0  # per attempt; an item costs at most timeout × retries
    judge_retries: int = 2  # attempts per item
    judge_concurrency: int = 8  # requests in flight (http)
    judge_cooldown_s: float = 300.0  # http: after max(concurrency, 4) failed items in a row: not asked this long
    judge_max_tokens: int = 1024  # reply budget: room for a short reason and the verdict
    judge_tasks: list[str] = field(default_factory=lambda: ["qa", "math"])  # tasks the judge may rescue

    def validate(self, key: str) -> None:
        if self.judge == "none":
            stray = [k for k in ("judge_url", "judge_model", "judge_path") if getattr(self, k)]
            if self.judge_key_env != "OPENAI_API_KEY":
                stray.append("judge_key_env")
            _check(not stray, f"{key}.judge", f"'http' or 'local' when {', '.join(stray)} is set", self.judge)
        if self.judge == "http":
            _check(bool(self.judge_url and self.judge_model), f"{key}.judge_url / judge_model",
                   "both set when judge = 'http'", (self.judge_url, self.judge_model))
        if self.judge == "local":
            _check(bool(self.judge_path), f"{key}.judge_path", "a checkpoint when judge = 'local'", self.judge_path)
        _check(self.judge_timeout_s > 0 and self.judge_retries >= 1 and self.judge_concurrency >= 1
               and self.judge_max_tokens >= 1, f"{key}.judge_timeout_s / judge_retries / judge_concurrency / "
               f"judge_max_tokens", "timeout > 0 and integers >= 1",
               (self.judge_timeout_s, self.judge_retries, self.judge_concurrency, self.judge_max_tokens))
        _check(self.judge_cooldown_s >= 0, f"{key}.judge_cooldown_s", ">= 0 (0: never stop asking)",
               self.judge_cooldown_s)
        _check(set(self.judge_tasks) <= {"qa", "math", "choice"}, f"{key}.judge_tasks",
               "a list of qa, math, choice", self.judge_tasks)


@dataclass
class RolloutConfig:
    """The paged KV cache and scheduler of in-process generation (training, eval, judge)."""
    block_size: int = 16  # tokens per KV block: a power of two, 16 .. 256 (flash-attn's paged API wants 256)
    gpu_memory_fraction: float = 0.5  # of the free GPU memory, when cache_mb is 0
    cache_mb: int = 0  # explicit KV cache budget in MiB; 0: the fraction on a GPU, 2 GiB on CPU
    max_num_seqs: int = 256  # sequences decoding together
    max_prefill_tokens: int = 2048  # prompt tokens prefilled per scheduler step (chunked prefill)
    decode_backend: Literal["auto", "torch", "triton"] = "auto"  # $LONGRL_PAGED_BACKEND overrides
    # decode steps replayed from CUDA graphs: auto (on a GPU with the Triton backend), on, eager (the graph step
    # without capture: checks), off; $LONGRL_CUDA_GRAPHS overrides
    cuda_graphs: Literal["auto", "on", "eager", "off"] = "auto"
    # a graph decode step launched before the last step's tokens are read: auto (with captured graphs), on,
    # off; $LONGRL_LOOKAHEAD overrides
    lookahead: Literal["auto", "on", "off"] = "auto"

    def validate(self, key: str) -> None:
        _check(16 <= self.block_size <= 256 and not self.block_size & (self.block_size - 1), f"{key}.block_size",
               "a power of two from 16 to 256", self.block_size)
        _check(0 < self.gpu_memory_fraction <= 1, f"{key}.gpu_memory_fraction", "a number in (0, 1]",
               self.gpu_memory_fraction)
        _check(self.cache_mb >= 0 and self.max_num_seqs >= 1 and self.max_prefill_tokens >= 1,
               f"{key}.cache_mb / max_num_seqs / max_prefill_tokens", "cache_mb >= 0, the others >= 1",
               (self.cache_mb, self.max_num_seqs, self.max_prefill_tokens))

    def cache_config(self):
        from .rollout.paged import CacheConfig
        return CacheConfig(block_size=self.block_size, gpu_memory_fraction=self.gpu_memory_fraction,
                           max_bytes=self.cache_mb << 20 if self.cache_mb else None,
                           max_num_seqs=self.max_num_seqs, max_prefill_tokens=self.max_prefill_tokens,
                           decode_backend=self.decode_backend, cuda_graphs=self.cuda_graphs,
                           lookahead=self.lookahead)


@dataclass
class KernelsConfig:
    """The fused log-prob / GRPO loss kernels. $LONGRL_KERNEL_BACKEND and $LONGRL_CHUNK_MB,
    when set, override these."""
    backend: Literal["auto", "torch", "triton"] = "auto"  # auto: triton on CUDA, torch elsewhere
    chunk_mb: int = 0  # bytes of one [chunk, vocab] fp32 logits block; 0: 256 MiB on CPU, 2 GiB on GPU
    # a chunk's logits under bf16 compute: "fp32" (written in fp32 by the product: log-probs and ratios
    # without bf16 rounding) or "compute" (bf16: a third of the bytes, a few 0.01 nat of rounding a log-prob)
    logits: Literal["fp32", "compute"] = "fp32"

    def validate(self, key: str) -> None:
        _check(self.chunk_mb >= 0, f"{key}.chunk_mb", "an integer >= 0 (0: default)", self.chunk_mb)

    def resolved(self) -> tuple[str, int]:
        """(backend, chunk MiB or 0), the environment winning over the recipe."""
        import os
        backend = os.environ.get("LONGRL_KERNEL_BACKEND") or self.backend
        chunk = int(os.environ.get("LONGRL_CHUNK_MB") or self.chunk_mb)
        return backend, chunk


@dataclass
class ParallelConfig:
    """Ranks come from the launcher (torchrun sets WORLD_SIZE / RANK); sp of them share each
    sequence (ring attention), the rest split the batch (dp = world / sp). Parameters are
    sharded over all of them (FSDP2)."""
    sp: int = 1  # sequence-parallel group size
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on CUDA, else gloo
    timeout_s: float = 600.0  # every collective; a dead rank ends the job instead of hanging it

    def validate(self, key: str) -> None:
        _check(self.sp >= 1, f"{key}.sp", "an integer >= 1", self.sp)
        _check(self.timeout_s > 0, f"{key}.timeout_s", "a number > 0", self.timeout_s)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self, key: str = "") -> None:
        """Checks across sections (each section checks its own keys)."""
        rl = self.rl
        if rl.data:
            longest = max(p.max_input_tokens for p in rl.phases) + rl.max_new_tokens
            _check(self.train.token_budget >= longest, "train.token_budget",
                   f"at least the longest RL sequence, {longest} tokens (largest rl.phases max_input_tokens "
                   f"{longest - rl.max_new_tokens} + rl.max_new_tokens {rl.max_new_tokens})",
                   self.train.token_budget)


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
    if isinstance(obj, Config):  # checks across sections, once each section is sound
        try:
            obj.validate()
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
        expected = " or ".join(_type_name(a) for a in get_args(tp))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {key}: expected {expected}, got {value!r}")
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
        from .data.jsonl import DataError, read_text
        try:
            data = tomllib.loads(read_text(path))  # UTF-8, a byte-order mark dropped
        except DataError as e:
            raise ConfigError(f"recipe {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"recipe {path}: not valid TOML ({e})") from None
        source = str(path)
        if not overrides:  # with overrides, the merged result is what must be valid (a recipe may
            from_dict(cls, data, source=source)  # leave a key, such as judge_url, to the command line)
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
