"""Where one GPU update's time goes: torch.profiler over bench/update_case.py's update, the
CUDA kernels ranked by total time.

    python3 -m bench.profile_case --layout shared [--prompt 16384 --response 2048 --group 8] [--top 25]

A diagnosis tool for the GPU suite's figures (not a bench: no target, nothing recorded).
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=("shared", "repeated"), default="shared")
    p.add_argument("--prompt", type=int, default=16384)
    p.add_argument("--response", type=int, default=2048)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.update_case import group_batch, trainer_for
    trainer = trainer_for(True, a.layout, a.group, a.response)
    vocab = trainer.model.lm_head_weight.shape[0]
    batch = group_batch(a.prompt, a.response, a.group, vocab)
    trainer._update(batch, defaultdict(float))  # warm: every kernel compiled and tuned
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer._update(batch, defaultdict(float))
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.top, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
