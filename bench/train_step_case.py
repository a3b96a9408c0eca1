"""One full GRPO/DAPO step (rollout, reward, update) with its time split and tokens/s.

    python -m bench.train_step_case          CPU: embedded SmolLM2-135M, CI-sized batch
    python -m bench.train_step_case --tiny   CPU, toy-sized (short documents, 4 new tokens):
                                             checks the bench itself, not a figure
    python3 -m bench.train_step_case --gpu   GPU: a Qwen2-1.5B-shaped model with random bf16
                                             weights and a byte tokenizer (no downloads)

The reward is a smooth toy score (share of 'e' in the completion) so that every group has
variance and the update always runs. Prints the step's metrics row as one JSON line, with
the two settings that decide which of the step's timed parts must be non-zero.
`split_problems` checks that the parts add up to the step (the bench and GPU suite use it).
"""
from __future__ import annotations

import argparse
import json
import sys

PARTS = ("time/rollout", "time/reward", "time/old_logprob", "time/ref_logprob", "time/update")


class ByteTokenizer:
    """Bytes as token ids (0..255); an id past 255 decodes to a letter (id mod 26), so that a
    random-weight model's completions, which are almost all such ids, still read as text whose
    toy score varies within a group. Enough to drive the engine."""
    chat_template = None
    eos_token_id, unk_token_id, name_or_path = 256, None, "bytes"

    def __len__(self):
        return 257

    def encode(self, text, add_special_tokens=True):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i if i < 256 else 97 + i % 26 for i in ids).decode("utf-8", "replace")

    def convert_tokens_to_ids(self, token):
        return None


class ToyReward:
    def __call__(self, items):
        from engine.rewards import RewardResult
        out = []
        for it in items:
            text = it.completion.replace(" ", "")
            score = text.count("e") / max(len(text), 1)
            out.append(RewardResult(score, score, None, None))
        return out


def gpu_model():
    """A Qwen2-1.5B-shaped decoder on CUDA with random fp32 master weights (no download; the
    step computes in bf16, train.precision bf16-mixed), every layer checkpointed (32K-token
    micro-batches of a 1.5B model)."""
    import torch

    from engine.model import Decoder, DecoderConfig
    hf = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
          "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
          "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True}
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Decoder(DecoderConfig.from_hf(hf))
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.02)
    model.set_activation_checkpointing(True)
    return model


def budget_from_free_memory(free_bytes: int, layers: int, hidden: int, cap: int = 32768, floor: int = 2048) -> int:
    """Update tokens per micro-batch that fit half of `free_bytes` (after weights, gradients,
    AdamW state and the rollout copy are allocated), with every layer checkpointed: per token,
    each layer's saved bf16 input (2·H bytes) plus one layer's recomputed internals at a time
    (~40·H bytes: attention and MLP activations and their gradients); a multiple of 1024
    within floor..cap."""
    per_token = layers * hidden * 2 + 40 * hidden * 2
    tokens = int(free_bytes * 0.5) // per_token
    return max(floor, min(cap, tokens // 1024 * 1024))


def split_problems(row: dict, floor: float = 0.9) -> list[str]:
    """What is wrong with a step row's time split ([] when nothing). The parts are disjoint
    intervals inside time/step, so their sum cannot exceed it, and everything step() does
    outside them (curriculum bookkeeping, metrics) is small: the sum must reach floor x step.
    rollout, reward and update always run; old log-probs only with mini_batches > 1, ref
    log-probs only with a reference model: each must be > 0 exactly when it ran, else 0."""
    step, parts = row["time/step"], {k: row.get(k, 0.0) for k in PARTS}
    total = sum(parts.values())
    problems = []
    if total > step * (1 + 1e-9):
        problems.append(f"parts sum to {total:.3f}s > time/step {step:.3f}s")
    if total < floor * step:
        problems.append(f"parts sum to {total:.3f}s < {floor:.0%} of time/step {step:.3f}s: time unaccounted for")
    must = {"time/rollout": True, "time/reward": True, "time/update": True,
            "time/old_logprob": row["config/mini_batches"] > 1, "time/ref_logprob": row["config/ref_model"]}
    for key, ran in must.items():
        if ran and not parts[key] > 0:
            problems.append(f"{key} = {parts[key]} but it must have run")
        if not ran and parts[key] != 0:
            problems.append(f"{key} = {parts[key]:.3f}s but it should not have run")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--tiny", action="store_true")
    a = p.parse_args(argv)

    import torch

    from engine.config import RLConfig, TrainConfig
    from engine.curriculum import PhaseSampler
    from engine.data import synthetic
    from engine.model import load_model
    from engine.train.rl import GRPOTrainer

    if a.gpu:
        model = gpu_model()
        tok = ByteTokenizer()
        records = synthetic.generate(16, (1200, 1600), seed=0, kinds=("lookup", "two_hop"))
        rl = RLConfig(group_size=8, batch_prompts=8, max_new_tokens=256, temperature=1.0, top_p=1.0)
        params = sum(p.numel() for p in model.parameters())
        free = torch.cuda.mem_get_info()[0] - params * (3 * 4 + 2)  # fp32 grads + AdamW, the bf16 rollout copy
        budget = budget_from_free_memory(free, model.config.num_layers, model.config.hidden_size,
                                         floor=-(-(16384 + rl.max_new_tokens) // 1024) * 1024)  # one prompt + response
        train = TrainConfig(lr=1e-6, token_budget=budget)
        max_input = 16384
    else:
        model, tok = load_model("smollm2-135m-instruct", device="cpu", dtype="float32")
        lo_hi, group, new = ((30, 60), 2, 4) if a.tiny else ((200, 400), 4, 32)
        records = synthetic.generate(8, lo_hi, seed=0, kinds=("lookup", "two_hop"))
        rl = RLConfig(group_size=group, batch_prompts=2, max_new_tokens=new, temperature=1.0, top_p=1.0)
        train = TrainConfig(lr=1e-6, token_budget=4096)
        max_input = 1024
    from engine.train.loop import Precision
    precision = Precision.named("auto", "cuda" if a.gpu else "cpu")  # as a run picks it: bf16-mixed on a GPU
    trainer = GRPOTrainer(model, tok, records, rl, train, reward=ToyReward(), total_steps=2, precision=precision)
    sampler = PhaseSampler([r.id for r in records], seed=0)
    row = trainer.step(sampler, max_input=max_input)
    keep = ("time/step", *PARTS, "rollout_tokens_per_s", "update_tokens_per_s", "update_tokens",
            "response/mean_len", "dynamic/kept_groups", "loss", "mfu", "gpu/max_allocated_gb")
    print(json.dumps({"device": "cuda" if a.gpu else "cpu", "config/precision": precision.name,
                      "config/token_budget": train.token_budget,
                      "config/mini_batches": rl.mini_batches,
                      "config/ref_model": trainer.ref_model is not None, **{k: row[k] for k in keep if k in row}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
