"""One GRPO update (forward + backward of every micro-batch) on one group, in this process,
in the shared-prefix layout or the repeated one, with its time and peak memory.

    python -m bench.update_case --layout shared|repeated --prompt 512 --response 64 --group 8
    python3 -m bench.update_case --gpu --layout shared --prompt 16384 --response 2048 --group 8

CPU: the embedded SmolLM2-135M, fp32, token budget 4,096. --gpu: a Qwen2-1.5B-shaped model
with random fp32 master weights computing in bf16 (train.precision bf16-mixed), every layer
checkpointed, token budget 32,768. The trainer's own
_update runs (micro-batches, fused loss, behaviour log-probs); the optimizer step is left
out (gradients are zeroed instead), so the figure is the update's forward + backward.
Prints one JSON line: time (median of --repeats rounds, with min–max), tokens through the
model, peak memory above the model and its gradients.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from types import SimpleNamespace

from bench.kernel_case import _rss_bytes
from bench.spread import spread
from bench.train_step_case import ByteTokenizer, gpu_model  # the rollout never runs here: any tokenizer


def build(gpu: bool):
    from engine.model import load_model
    return gpu_model() if gpu else load_model("smollm2-135m-instruct", device="cpu", dtype="float32")[0]


def trainer_for(gpu: bool, layout: str, group: int, response: int):
    """The trainer whose _update is measured: advantages ±1, the optimizer step replaced by
    zeroing the gradients (the figure is forward + backward)."""
    from engine.config import RLConfig, TrainConfig
    from engine.train.rl import GRPOTrainer
    rl = RLConfig(group_size=group, batch_prompts=1, max_new_tokens=response, temperature=1.0,
                  shared_prefix=layout == "shared")
    from engine.train.loop import Precision
    precision = Precision.named("auto", "cuda" if gpu else "cpu")  # as a run picks it: bf16-mixed on a GPU
    trainer = GRPOTrainer(build(gpu), ByteTokenizer(), [], rl, TrainConfig(lr=0.0, token_budget=budget_for(gpu)),
                          precision=precision)
    adv = [(-1.0) ** i for i in range(group)]
    trainer._advantages = lambda b: (adv, [True] * len(adv), {})

    def no_step(step, total, loss_total):
        trainer.optimizer.zero_grad(set_to_none=False)
        return {"skipped": True, "lr": 0.0}
    trainer.opt_step = no_step
    return trainer


def budget_for(gpu: bool) -> int:
    return 32768 if gpu else 4096


def group_batch(prompt: int, response: int, group: int, vocab: int, seed: int = 0):
    import torch

    from engine.rollout.sampling import Completion
    from engine.train.rl import Group
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (prompt + group * response,), generator=g).tolist()
    comps = [Completion(ids[prompt + i * response: prompt + (i + 1) * response], [-1.0] * response, "stop")
             for i in range(group)]
    rec = SimpleNamespace(id="bench", task="qa", data_source="bench")
    return [Group(rec, ids[:prompt], comps, [0.0] * group, [0.0] * group)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=("shared", "repeated"), required=True)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--response", type=int, default=64)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--gpu", action="store_true")
    a = p.parse_args(argv)

    import torch

    trainer = trainer_for(a.gpu, a.layout, a.group, a.response)
    vocab = trainer.model.lm_head_weight.shape[0]

    def sync():
        if a.gpu:
            torch.cuda.synchronize()

    batch = group_batch(a.prompt, a.response, a.group, vocab)
    # warm-up (the gradients exist after it): on a GPU at full size, so the kernels' choices and
    # the allocator's pool for this shape are made before the clock starts; on CPU a tiny one
    trainer._update(batch if a.gpu else group_batch(8, 4, 2, vocab, seed=1), defaultdict(float))
    sync()
    if a.gpu:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times, tokens = [], 0
    for _ in range(a.repeats):
        sync()
        t0 = time.perf_counter()
        row = trainer._update(batch, defaultdict(float))
        sync()
        times.append(time.perf_counter() - t0)
        tokens = row["update_tokens"]
    if a.gpu:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    s = spread(times)
    print(json.dumps({"layout": a.layout, "prompt": a.prompt, "response": a.response, "group": a.group,
                      "device": "cuda" if a.gpu else "cpu", "budget": budget_for(a.gpu), "seconds": s["median"],
                      "time": s, "tokens": tokens, "peak_extra_bytes": max(peak, 0)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
