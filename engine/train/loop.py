"""What every training loop shares: one optimizer step (LR, clipping, non-finite skip), the
start of a run (seed, model, activation checkpointing) and its guard (Ctrl-C: a checkpoint at
the step's end; out-of-memory advice). SFT and GRPO/DAPO both step through these, so a fix lands in both."""
from __future__ import annotations

import math
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable

import torch

from ..config import Config, TrainConfig
from .optim import lr_at


class TrainingStopped(RuntimeError):
    """Too many non-finite losses in a row (or another stop with advice in its message)."""


class OptimizerStep:
    """Sets the step's LR, clips the gradient, and steps — or, when the loss or the gradient
    norm is not finite, drops the gradient and counts a bad step; `max_bad_steps` in a row
    stop the run (a bad batch must not poison the weights, a diverged run must not go on)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg
        self.bad_steps = 0

    def __call__(self, step: int, total_steps: int, loss_total: float) -> dict:
        """-> {lr, grad_norm, skipped}. step: 0-based index of this optimizer step."""
        lr = lr_at(step, self.cfg, total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = grad_norm(params)
        if params and self.cfg.grad_clip and math.isfinite(norm) and norm > self.cfg.grad_clip:
            coef = self.cfg.grad_clip / (norm + 1e-6)
            for p in params:
                p.grad.mul_(coef)
        if not (math.isfinite(loss_total) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            if self.bad_steps >= self.cfg.max_bad_steps:
                raise TrainingStopped(f"{self.bad_steps} non-finite losses in a row at step {step + 1}; "
                                      f"lower train.lr or check the data")
            return {"lr": lr, "grad_norm": norm, "skipped": True}
        self.bad_steps = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": norm, "skipped": False}


def grad_norm(params) -> float:
    """The global L2 norm of the parameters' gradients, accumulated in float64 (an fp32 norm of a
    large embedding's gradient drifts by ~1e-4 relative) without a float64 copy of any gradient
    (the reduction casts as it reads), summed on the gradients' device and read once. Under FSDP2
    each gradient is a sharded DTensor: its norm is reduced over the ranks, so every rank gets
    the global norm."""
    total = None
    for p in params:
        norm = torch.linalg.vector_norm(p.grad, dtype=torch.float64)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        total = norm * norm if total is None else total + norm * norm
    return 0.0 if total is None else math.sqrt(float(total))


class Precision:
    """How a training run computes: its weights (the master copy) stay fp32; `compute` is the
    dtype of the forward and backward (None: fp32 too). bf16-mixed runs the model under
    autocast (under FSDP2 its mixed-precision policy casts the gathered weights instead) and
    hands the fused losses bf16 hidden states and lm_head; gradients land on the fp32 master
    weights and AdamW's state is fp32, so steps far below a bf16 ulp are not lost."""

    def __init__(self, compute: torch.dtype | None, device_type: str):
        self.compute, self.device_type = compute, device_type

    @classmethod
    def of(cls, cfg: Config, device) -> "Precision":
        return cls.named(cfg.train.precision, device)

    @classmethod
    def named(cls, mode: str, device) -> "Precision":
        """train.precision's value on `device`: auto is bf16-mixed on CUDA, fp32 elsewhere."""
        device = torch.device(device)
        if mode == "auto":
            mode = "bf16-mixed" if device.type == "cuda" else "fp32"
        return cls(torch.bfloat16 if mode == "bf16-mixed" else None, device.type)

    @property
    def name(self) -> str:
        return "fp32" if self.compute is None else "bf16-mixed"

    def autocast(self):
        from contextlib import nullcontext
        return nullcontext() if self.compute is None else torch.autocast(self.device_type, dtype=self.compute)

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        """An input of the fused losses in the compute dtype (differentiable: the gradient of a
        cast master weight comes back to it in fp32)."""
        return t if self.compute is None or t.dtype == self.compute else t.to(self.compute)


def kernel_args(kernels, weight: torch.Tensor, precision: Precision) -> dict:
    """The fused kernels' keyword arguments from the [kernels] section (engine.config.KernelsConfig,
    None: its defaults; $LONGRL_KERNEL_BACKEND / $LONGRL_CHUNK_MB override): the row backend and,
    when a chunk budget is set, the tokens per chunk of logits at the lm_head `weight`'s vocabulary."""
    from kernels.rows import logit_bytes, pick_rows, rows_for_budget

    from ..config import KernelsConfig
    kernels = kernels or KernelsConfig()
    backend, chunk_mb = kernels.resolved()
    per_logit = logit_bytes(pick_rows(backend, weight.device), precision.compute or weight.dtype, kernels.logits)
    return {"backend": backend, "chunk_tokens": rows_for_budget(weight.shape[0], chunk_mb, per_logit) if chunk_mb
            else None, "logits": kernels.logits}


def start_model(cfg: Config, source):
    """Seed, then load `source` for training: fp32 master weights whatever train.precision
    computes in (model.dtype applies to eval and generate); the tokenizer is required."""
    from ..config import ConfigError
    from ..model import load_model

    if cfg.model.dtype in ("bfloat16", "float16"):
        raise ConfigError(f"model.dtype = {cfg.model.dtype} would train {cfg.model.dtype} weights with "
                          f"{cfg.model.dtype} optimizer state, and AdamW steps below half an ulp (most steps at "
                          f"lr 1e-6..1e-5) would be lost: leave model.dtype at auto and set train.precision = "
                          f"'bf16-mixed' (fp32 master weights, bf16 compute)")
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = load_model(source, device=cfg.model.device, dtype="float32",
                                  attn_backend=cfg.model.attn_backend)
    if tokenizer is None:
        raise ValueError(f"model {source}: training needs the tokenizer files beside the weights")
    model.set_activation_checkpointing(cfg.model.activation_checkpointing)
    return model, tokenizer


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


class Interrupts:
    """Ctrl-C during training. The first asks the run to stop at the end of the step it is in:
    the loop then writes a checkpoint of that finished step and stops (a step cut in half would
    save data positions, RNG and weights that disagree, and the resumed run would skip or repeat
    data). The second stops at once, saving nothing: the last checkpoint stays the one to resume.
    Under several ranks `requested()` is decided together (a max over the ranks), so every rank
    stops after the same step. Outside the main thread (no signal handler there) Ctrl-C simply
    stops at once."""

    def __init__(self, parallel=None):
        self.parallel, self.asked, self._previous = parallel, False, None

    def __enter__(self) -> "Interrupts":
        # not where Ctrl-C was turned off (a run started with `nohup ... &`): it stays off
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print("\ninterrupt: finishing this step, then writing a checkpoint (Ctrl-C again stops now, without one)",
              file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether to stop after the step just finished (every rank gets the same answer)."""
        if self.parallel is None:
            return self.asked
        return bool(self.parallel.max(int(self.asked)))


class Interrupted(KeyboardInterrupt):
    """The run stopped at a step's end on Ctrl-C, its checkpoint written."""


@contextmanager
def guarded(bar, parallel=None, last: Callable[[], object] = lambda: None):
    """Around a training loop: -> its Interrupts (the loop asks `requested()` after each step,
    saves and raises Interrupted). A second Ctrl-C stops mid-step, naming the checkpoint to
    resume from (`last()`). Out of memory: stop with advice on what to turn down."""
    with Interrupts(parallel) as interrupts:
        try:
            yield interrupts
        except Interrupted as e:
            bar.close()
            print(f"\ninterrupted: checkpoint written to {e}; continue with --resume", file=sys.stderr)
            raise
        except KeyboardInterrupt:
            bar.close()
            path = last()
            where = f"the last checkpoint is {path}; continue with --resume" if path else "no checkpoint written yet"
            print(f"\nstopped mid-step without a checkpoint: {where}", file=sys.stderr)
            raise
        except torch.OutOfMemoryError as e:
            raise TrainingStopped(oom_advice(e)) from None


def oom_advice(err: Exception) -> str:
    return (f"out of memory ({str(err).splitlines()[0]}). Turn down, in this order: train.token_budget "
            f"(tokens per micro-batch), rl.max_new_tokens or the phase's max_input_tokens, kernels.chunk_mb "
            f"(the fused-loss chunk), rollout.gpu_memory_fraction or rollout.cache_mb (the KV cache); or set "
            f"model.activation_checkpointing = true")
