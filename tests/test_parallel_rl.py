"""The GRPO step over several gloo ranks equals one process.

The update: a fixed batch of groups (uneven prompt and response lengths, a token budget that
splits it into micro-batches, an odd group count so one data-parallel rank runs empty
micro-batches) through `GRPOTrainer._update` on (dp 1, sp 2), (dp 2, sp 1) and (dp 2, sp 2),
in the shared-prefix layout (group rows sharded over SP as one sequence, segment ids in the
ring) and the repeated one, on-policy and off-policy with a KL reference: the same loss and
grad norm, and the same weights after the step (fp32, 1e-5 relative).

The rollout: every rank generates its share of the prompts with an unsharded copy whose
weights are gathered from the shards; the gathered groups equal one process's."""
from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
from conftest import letters_checkpoint
from dist_helpers import run_ranks
from test_rl_train import LetterTokenizer

from engine.config import DataConfig, ParallelConfig, RLConfig, TrainConfig
from engine.data import synthetic
from engine.rollout.sampling import Completion

TIMEOUT_S = 150
PROMPT_LENS = [9, 14, 5]  # three groups: dp 2 splits them 2 / 1
RESPONSE_LENS = [[3, 7, 1, 5], [6, 2, 4, 4], [1, 8, 3, 2]]


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    return letters_checkpoint(tmp_path_factory.mktemp("letters-par"))


def make_trainer(path: str, rl_kw: dict, par=None):
    from engine.model import load_model
    from engine.parallel import parallelize
    from engine.train.rl import GRPOTrainer

    model, _ = load_model(path, device="cpu", dtype="float32")
    rl = RLConfig(**{"group_size": 4, "batch_prompts": 3, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0,
                     "max_rounds": 1, **rl_kw})
    rollout = ref = None
    if rl.kl_coef > 0:
        ref = copy.deepcopy(model).requires_grad_(False).eval()
    if par is not None:
        rollout = copy.deepcopy(model).requires_grad_(False).eval()
        parallelize(model, par.mesh)
    records = synthetic.generate(6, 12, seed=3, kinds=("lookup",))
    return GRPOTrainer(model, LetterTokenizer(), records, rl, TrainConfig(lr=1e-2, seed=0, token_budget=24),
                       total_steps=4, data=DataConfig(template="plain"), ref_model=ref, parallel=par,
                       rollout_model=rollout)


def fixed_batch(trainer):
    from engine.train.rl import Group
    g = torch.Generator().manual_seed(5)
    recs = list(trainer.records.values())
    batch = []
    for k, (p, lens) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
        prompt = torch.randint(0, 16, (p,), generator=g).tolist()
        comps = [Completion(torch.randint(0, 16, (n,), generator=g).tolist(),
                            (-torch.rand(n, generator=g) * 3).tolist(), "stop") for n in lens]
        rewards = [float(x) for x in torch.randint(0, 2, (len(lens),), generator=g)]
        rewards[k % len(lens)] = 1.0 - rewards[(k + 1) % len(lens)] if len(set(rewards)) == 1 else rewards[k % 4]
        batch.append(Group(recs[k], prompt, comps, rewards, list(rewards)))
    return batch


def weights_of(model) -> dict:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def one_process(path, rl_kw):
    trainer = make_trainer(path, rl_kw)
    out = trainer._update(fixed_batch(trainer), defaultdict(float))
    return out["loss"], out["grad_norm"], weights_of(trainer.model)


def _update_rank(rank, world, path, sp, rl_kw):
    from engine.parallel.fsdp import full_model_state
    from engine.parallel.runtime import Parallel

    par = Parallel.from_env(ParallelConfig(sp=sp, timeout_s=60))
    trainer = make_trainer(path, rl_kw, par)
    out = trainer._update(fixed_batch(trainer), defaultdict(float))
    state = {k: v.detach().numpy().copy() for k, v in full_model_state(trainer.model).items()}  # plain pickles
    return out["loss"], out["grad_norm"], state if rank == 0 else None, group_timeouts(par)


def group_timeouts(par) -> list[float]:
    """Seconds each group of the run's mesh times out after: each dimension's and the flattened one."""
    from engine.parallel import shard_mesh
    return [m.get_group()._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for m in (par.mesh["dp"], par.mesh["sp"], shard_mesh(par.mesh))]


CASES = [("dp1-sp2-seq-mean", 2, 2, {"aggregation": "seq-mean-token-mean"}), ("dp2-sp1", 2, 1, {}),
         ("dp1-sp2-repeated-offpolicy-kl", 2, 2, {"shared_prefix": False, "mini_batches": 2, "kl_coef": 0.1}),
         ("dp2-sp2-offpolicy", 4, 2, {"mini_batches": 2})]


@pytest.mark.parametrize("world,sp,rl_kw", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_update_on_several_ranks_equals_one_process(letters, world, sp, rl_kw):
    loss, norm, weights = one_process(letters, rl_kw)
    results = run_ranks(_update_rank, world, letters, sp, rl_kw, timeout=TIMEOUT_S)
    for r_loss, r_norm, _, timeouts in results:  # every rank logs the global figures
        assert r_loss == pytest.approx(loss, rel=1e-5, abs=1e-7)
        assert r_norm == pytest.approx(norm, rel=1e-5)
        assert timeouts == [60.0] * 3  # parallel.timeout_s bounds every group of the mesh, not the world's alone
    got = {k: torch.from_numpy(v) for k, v in results[0][2].items()}
    assert got.keys() == weights.keys()
    moved = 0
    for k, w in weights.items():
        err = float((got[k] - w).norm() / w.norm())
        assert err < 1e-5, f"{k}: off the one-process weights by {err:.2e}"
        moved += int(not torch.equal(w, make_reference_weight(letters, k)))
    assert moved == len(weights)  # the step changed every tensor: the comparison is not vacuous


_START: dict = {}


def make_reference_weight(path, name):
    if path not in _START:
        from engine.model import load_model
        _START[path] = weights_of(load_model(path, device="cpu", dtype="float32")[0])
    return _START[path][name]


def _rollout_rank(rank, world, path, sp):
    from engine.parallel.runtime import Parallel

    par = Parallel.from_env(ParallelConfig(sp=sp, timeout_s=60)) if world > 1 else None
    trainer = make_trainer(path, {"group_size": 3}, par)
    if par is not None:
        trainer._sync_rollout_weights()
    ids = list(trainer.records)[:5]  # five prompts over two ranks: 3 / 2
    groups = trainer._rollout(ids, 400, 1234, defaultdict(float))
    return [(g.record.id, [c.token_ids for c in g.completions], g.rewards) for g in groups]


def test_rollout_shares_equal_one_process(letters):
    one = _rollout_rank(0, 1, letters, 1)
    two = run_ranks(_rollout_rank, 2, letters, 1, timeout=TIMEOUT_S)
    assert two[0] == two[1] == one  # every rank holds every group, in prompt order
    assert len({tuple(map(tuple, toks)) for _, toks, _ in one}) == len(one)  # prompts draw different samples
