"""How many kernels a decode step launches: with the GPU's fused inference kernels and with torch's ops.

    python -m bench.launch_count [--layers 28 --groups 2 --n 2]

On a GPU a CUDA-graph decode step of a small model costs, per kernel, a few microseconds of
device time whatever the kernel's size (the H200 profile in the README: ~2 ms a step in small
elementwise kernels at batch 64), so the number of kernels is a cost of its own. This counts
them for one graph step (DecodeGraphs' static step, the one a graph captures), on CPU: every
torch operator the step dispatches that computes (views, and allocations without a fill, do
not launch anything on a GPU and are not counted) and every Triton launch (the operators the
Triton interpreter runs inside a launch are not counted; a `to` that copies is counted). A torch operator is about one CUDA
kernel (a split-K product adds one, a concatenation of many inputs may take more): the figure
is the step's structure, not its time.

The model is Qwen2-1.5B-shaped in everything but its widths (28 layers of 12 query / 2 K/V
heads, biases on q / k / v, tied embeddings, bf16), batch `groups` × `n` with each group's
samples sharing a 32-token prompt (the shared-prefix decode kernels). A launch serves the whole
batch, so the count does not grow with it; the default batch of 4 keeps the interpreter quick
(a batch of 64 takes it many minutes). "fused" is a GPU's
default in inference mode (engine.model.model.fused_kernels: each RMSNorm with the residual
add before it, RoPE with the K/V cache write, silu * up as one kernel each; q / k / v and gate /
up one product each, the model's projections stacked as the trainer's rollout copy has them,
engine.model.model.fuse_projections), stood in for on CPU; "torch" is $LONGRL_FUSED=torch.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernels run on CPU

# operators that launch nothing on a GPU: allocations left unfilled, and aliasing (views are found by schema)
NO_KERNEL = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty", "aten.new_empty_strided",
             "aten.lift_fresh", "aten.detach", "aten.alias"}


def count_step(model, groups: int, n: int, fused: bool, prompt_len: int = 32, new: int = 4) -> dict:
    """Roll out `groups` prompts × n samples of `new` tokens with the graph step run eagerly; -> the last
    decode step's {"torch_ops": {name: count}, "triton": {kernel: count}}."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from engine.model import model as model_mod
    from engine.rollout import CacheConfig, Generator, SamplingParams
    from engine.rollout.graphs import DecodeGraphs
    from kernels import triton_paged

    launcher = type(triton_paged._decode_partial_kernel)
    state = {"on": False, "in_kernel": False}
    step: dict = {}

    def storages(xs) -> set:
        return {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(xs)
                if isinstance(t, torch.Tensor)}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = str(func.overloadpacket)
            if state["on"] and not state["in_kernel"] and name not in NO_KERNEL:
                made = storages(out)
                # a view launches nothing, but an operator that may alias (`to` under inference mode) and
                # returned new memory copied; an operator that returns no tensor (promote_types) computed nothing
                if made and (not func.is_view or made - storages((args, kwargs))):
                    step["torch_ops"][name] = step["torch_ops"].get(name, 0) + 1
            return out

    real_forward, real_run = DecodeGraphs._forward, launcher.run
    real_fused, real_major = model_mod.fused_kernels, model_mod.weight_major

    def forward(self, b, ni):
        step.clear()
        step.update(torch_ops={}, triton={})
        state["on"] = True
        try:
            with Count():
                return real_forward(self, b, ni)
        finally:
            state["on"] = False

    def run(self, *args, **kwargs):
        if state["on"]:
            step["triton"][self.fn.__name__] = step["triton"].get(self.fn.__name__, 0) + 1
        state["in_kernel"] = True
        try:
            return real_run(self, *args, **kwargs)
        finally:
            state["in_kernel"] = False

    DecodeGraphs._forward, launcher.run = forward, run
    # a GPU's choice stood in for: the fused kernels in the graph step (inference mode), F.linear for every product
    model_mod.fused_kernels = (lambda x: state["on"]) if fused else (lambda x: False)
    model_mod.weight_major = lambda x, w: False
    try:
        gen = Generator(model, cache_cfg=CacheConfig(block_size=16, decode_backend="triton", cuda_graphs="eager"))
        params = SamplingParams(max_new_tokens=new, temperature=1.0, top_p=0.95, seed=0, ignore_eos=True,
                                stop_token_ids=[])
        gen.generate([[1 + i] * prompt_len for i in range(groups)], n=n, params=params)
    finally:
        DecodeGraphs._forward, launcher.run = real_forward, real_run
        model_mod.fused_kernels, model_mod.weight_major = real_fused, real_major
    if not step:
        raise RuntimeError("launch_count: no graph step ran")
    return dict(step)


def measure(layers: int = 28, groups: int = 2, n: int = 2) -> dict:
    import torch

    from engine.model import Decoder, DecoderConfig
    from engine.model.model import fuse_projections

    cfg = DecoderConfig.from_hf({"model_type": "qwen2", "vocab_size": 512, "hidden_size": 96, "intermediate_size": 64,
                                 "num_hidden_layers": layers, "num_attention_heads": 12, "num_key_value_heads": 2,
                                 "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                                 "tie_word_embeddings": True})
    torch.manual_seed(0)
    # the trainer's rollout copy: bf16, projections stacked (the "torch" path, $LONGRL_FUSED=torch, ignores that)
    model = fuse_projections(Decoder(cfg).to(torch.bfloat16))
    out = {"layers": layers, "batch": groups * n}
    for label, fused in (("fused", True), ("torch", False)):
        step = count_step(model, groups, n, fused)
        ops, triton_launches = sum(step["torch_ops"].values()), sum(step["triton"].values())
        out[label] = {"launches": ops + triton_launches, "torch_ops": ops, "triton_launches": triton_launches,
                      "per_layer": (ops + triton_launches) / layers, "by_name": {**step["torch_ops"], **step["triton"]}}
        print(f"{label:>5}: {ops + triton_launches} launches a decode step ({ops} torch operators + "
              f"{triton_launches} Triton), {(ops + triton_launches) / layers:.1f} a layer", file=sys.stderr)
    out["saved"] = out["torch"]["launches"] - out["fused"]["launches"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--n", type=int, default=2, help="samples per group (batch = groups × n)")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.layers, a.groups, a.n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
