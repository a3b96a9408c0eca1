"""`longrl sft` under torchrun on CPU (gloo): 2 processes as sequence parallel (sp 2) or data
parallel (dp 2) log the same loss and gradient norm and reach the same weights as one
process; a checkpoint written at one world size resumes at another and finishes as the
uninterrupted run does. Each run is a real `python -m torch.distributed.run` subprocess,
under a deadline."""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_model_with_tokenizer

from engine.data import synthetic
from engine.data.records import write_docqa

DEADLINE_S = 240


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, smollm):
    root = tmp_path_factory.mktemp("ptrain")
    model_dir = tiny_model_with_tokenizer(root / "tiny", smollm[1])  # tied embeddings, SmolLM2's vocabulary
    write_docqa(synthetic.generate(16, (40, 120), seed=3, kinds=("lookup",)), root / "sft.jsonl")
    path = root / "r.toml"
    path.write_text(f'''
[model]
path = "{model_dir}"
dtype = "float32"
[train]
lr = 1e-3
token_budget = 400
seed = 0
save_every = 2
keep_last = 3
[sft]
data = ["{root / 'sft.jsonl'}"]
max_steps = 3
batch_examples = 5
max_input_tokens = 300
''')
    return root, path


def run(args: list[str], nproc: int = 1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launcher, "-m", "engine.cli", "sft", *args], capture_output=True, text=True, env=env,
                          timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["stage"] == "sft"]


def weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in glob.glob(str(ckpt / "model" / "*.safetensors")):
        out.update(load_file(f))
    return out


def same_run(a: Path, b: Path, steps=(1, 2, 3)):
    ra, rb = {r["step"]: r for r in rows(a)}, {r["step"]: r for r in rows(b)}
    for s in steps:
        assert rb[s]["loss"] == pytest.approx(ra[s]["loss"], rel=1e-6), f"step {s} loss"
        assert rb[s]["grad_norm"] == pytest.approx(ra[s]["grad_norm"], rel=1e-6), f"step {s} grad norm"
    wa, wb = weights(a / "step-000003"), weights(b / "step-000003")
    assert wa.keys() == wb.keys()
    for k in wa:
        err = float((wa[k] - wb[k]).norm() / wa[k].norm())
        assert err < 1e-5, f"{k}: weights off the one-process run by {err:.2e}"


@pytest.fixture(scope="module")
def one_process(recipe):
    root, path = recipe
    run(["--recipe", str(path), f"--train.out_dir={root / 'one'}"])
    return root / "one"


@pytest.mark.parametrize("sp", [2, 1], ids=["sp2", "dp2"])
def test_two_processes_equal_one(recipe, one_process, sp):
    root, path = recipe
    out = root / f"two-sp{sp}"
    proc = run(["--recipe", str(path), f"--train.out_dir={out}", f"--parallel.sp={sp}"], nproc=2)
    assert proc.stdout.count("sft done") == 1  # rank 0 alone speaks
    same_run(one_process, out)
    # mid-run checkpoints are sharded (torch.distributed.checkpoint), the last one exported too
    mid, last = out / "step-000002", out / "step-000003"
    assert (mid / "dcp" / ".metadata").is_file() and not (mid / "optimizer.pt").exists()
    assert not list((mid / "model").glob("*.safetensors")) and list((last / "model").glob("*.safetensors"))
    # `longrl convert` reads the sharded weights in one process: those of the one-process step 2
    converted = root / f"converted-sp{sp}"
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "convert", str(mid), str(converted)],
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from safetensors.torch import load_file
    wa, wb = weights(one_process / "step-000002"), {}
    for f in converted.glob("*.safetensors"):
        wb.update(load_file(f))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).norm() / wa[k].norm()) for k in wa) < 1e-5


def rolled_back(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` as if killed after checkpoint `step`: later checkpoints and rows gone."""
    shutil.copytree(src, dst)
    for d in dst.glob("step-*"):
        if int(d.name.split("-")[1]) > step:
            shutil.rmtree(d)
    (dst / "latest").write_text(f"step-{step:06d}")
    kept = [line for line in (dst / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    return dst


@pytest.mark.parametrize("direction", ["1-to-2", "2-to-1"])
def test_checkpoints_resume_at_another_world_size(recipe, one_process, direction):
    root, path = recipe
    if direction == "1-to-2":
        src, nproc, extra = one_process, 2, ["--parallel.sp=2"]
    else:
        src = root / "two-sp2"
        if not (src / "step-000003").exists():
            run(["--recipe", str(path), f"--train.out_dir={src}", "--parallel.sp=2"], nproc=2)
        nproc, extra = 1, []
    out = rolled_back(src, root / f"resume-{direction}", 2)
    run(["--recipe", str(path), f"--train.out_dir={out}", "--resume", *extra], nproc=nproc)
    same_run(one_process, out)


def test_generate_refuses_several_processes(recipe):
    root, path = recipe
    env = {**os.environ, "WORLD_SIZE": "2"}
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "--recipe", str(path), "--prompt", "hi"],
                          capture_output=True, text=True, env=env, timeout=DEADLINE_S)
    assert proc.returncode == 2 and "generate runs on one process" in proc.stderr


def _worker_pids(local_rank: int) -> list[int]:
    """The torchrun workers of this machine with LOCAL_RANK = local_rank running engine.cli."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"engine.cli" in cmd and f"LOCAL_RANK={local_rank}".encode() in env:
            pids.append(int(d.name))
    return pids


def test_a_killed_rank_ends_the_job_and_the_run_resumes(recipe, tmp_path):
    """SIGKILL one rank mid-run (launched with --nproc 2): the job ends with an error naming
    the failure instead of hanging; --resume on one process then finishes with the metrics
    and weights of an uninterrupted run."""
    import signal
    import time

    root, path = recipe
    steps = ["--sft.max_steps=6"]
    ref = tmp_path / "uninterrupted"
    run(["--recipe", str(path), f"--train.out_dir={ref}", *steps])
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "engine.cli", "sft", "--recipe", str(path), "--nproc", "2",
                            "--parallel.sp=2", f"--train.out_dir={out}", *steps], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + DEADLINE_S
        while time.time() < deadline and not (
                (out / "metrics.jsonl").exists() and len(rows(out)) >= 3):  # step 2's checkpoint is written
            assert job.poll() is None, job.communicate()[1][-2000:]
            time.sleep(0.2)
        victims = _worker_pids(1)
        assert victims, "no rank-1 worker found"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        _, err = job.communicate(timeout=120)  # torchrun stops the other rank: no hang
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "SIGKILL" in err or "Signal 9" in err or "exitcode" in err, err[-2000:]
    run(["--recipe", str(path), f"--train.out_dir={out}", "--resume", *steps])
    ra, rb = {r["step"]: r for r in rows(ref)}, {r["step"]: r for r in rows(out)}
    assert sorted(rb) == list(range(1, 7))
    for s in range(1, 7):
        assert rb[s]["loss"] == pytest.approx(ra[s]["loss"], rel=1e-6), f"step {s} loss"
        assert rb[s]["grad_norm"] == pytest.approx(ra[s]["grad_norm"], rel=1e-6), f"step {s} grad norm"
    wa, wb = weights(ref / "step-000006"), weights(out / "step-000006")
    assert max(float((wa[k] - wb[k]).norm() / wa[k].norm()) for k in wa) < 1e-5


def test_eval_on_two_processes_equals_one(recipe, tmp_path):
    """`longrl eval --nproc 2`: items split over the ranks, merged by rank 0 into one
    items.jsonl in item order, the same rows and summary as one process (greedy)."""
    root, path = recipe
    data = tmp_path / "bench.jsonl"
    write_docqa(synthetic.generate(5, (40, 80), seed=9, kinds=("lookup",)), data)
    common = ["--recipe", str(path), "--data", f"synth={data}", "--eval.max_new_tokens=4", "--eval.temperature=0",
              "--eval.batch_items=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = {}
    for nproc in (1, 2):
        out = tmp_path / f"eval{nproc}"
        proc = subprocess.run([sys.executable, "-m", "engine.cli", "eval", *common, "--out", str(out),
                               "--nproc", str(nproc)], capture_output=True, text=True, env=env, timeout=DEADLINE_S)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("per-sample rows") == 1  # rank 0 alone prints
        outs[nproc] = out
    one, two = ((o / "items.jsonl").read_text().splitlines() for o in (outs[1], outs[2]))
    assert len(one) == 5 and one == two
    assert not list(outs[2].glob("items.rank*.jsonl"))  # parts merged away
    s1, s2 = (json.loads((o / "summary.json").read_text())["results"] for o in (outs[1], outs[2]))
    assert s1 == s2
    # an interrupted data-parallel run: a part with one finished item and a torn line, nothing
    # merged; resumed on 2 processes, it ends with the rows of one process, the item not redone
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    marked = json.loads(one[3])
    marked["completion"] = "kept from the part"
    (resumed / "items.rank1.jsonl").write_text(json.dumps(marked) + "\n" + one[1][:40])
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "eval", *common, "--out", str(resumed),
                           "--nproc", "2"], capture_output=True, text=True, env=env, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows3 = (resumed / "items.jsonl").read_text().splitlines()
    assert [json.loads(r)["id"] for r in rows3] == [json.loads(r)["id"] for r in one]
    assert json.loads(rows3[3])["completion"] == "kept from the part"  # finished items are not generated again
    assert rows3[:3] + rows3[4:] == one[:3] + one[4:]


# ---- `longrl train` (SFT, then RL phases) on several processes -----------------------------
@pytest.fixture(scope="module")
def rl_recipe(recipe):
    root, sft_path = recipe
    write_docqa(synthetic.generate(8, (15, 90), seed=4, kinds=("lookup",)), root / "rl.jsonl")
    path = root / "rl.toml"
    path.write_text(sft_path.read_text().replace("max_steps = 3", "max_steps = 1") + f'''
[rl]
data = ["{root / 'rl.jsonl'}"]
phases = [{{ name = "short", max_input_tokens = 170, steps = 2 }},
          {{ name = "long", max_input_tokens = 300, steps = 2 }}]
group_size = 4
batch_prompts = 2
max_new_tokens = 6
temperature = 1.0
top_p = 1.0
carry_ratio = 0.5
# a random tiny model earns no reward: keep every group, and an entropy bonus makes the loss,
# the gradients and so the weights depend on every sampled token
dynamic_sampling = false
entropy_coef = 0.01
[eval]
sets = ["synthetic:n=3,tokens=30-60,seed=21,kinds=lookup"]
max_new_tokens = 4
temperature = 0.0
''')
    return root, path


def train(args: list[str], nproc: int = 1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "train", *args, "--nproc", str(nproc)],
                          capture_output=True, text=True, env=env, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def all_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


RL_FIGURES = ("reward/mean", "accuracy", "response/mean_len", "loss", "grad_norm", "dynamic/kept_groups")


def same_train(a: Path, b: Path):
    ra, rb = all_rows(a), all_rows(b)
    def order(rows):
        return [(r["stage"], r["step"], r.get("label")) for r in rows]
    assert order(ra) == order(rb)
    for x, y in zip(ra, rb):
        if x["stage"] == "rl":
            assert x["examples"] == y["examples"], f"RL step {x['step']}: another curriculum draw"
            for key in RL_FIGURES:
                assert y.get(key) == pytest.approx(x.get(key), rel=1e-5), f"RL step {x['step']} {key}"
        elif x["stage"] == "eval":
            assert y["accuracy"] == x["accuracy"], x["label"]
        else:
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-6)
    wa, wb = weights(a / "rl-step-000004"), weights(b / "rl-step-000004")
    assert max(float((wa[k] - wb[k]).norm() / wa[k].norm()) for k in wa) < 1e-5


@pytest.fixture(scope="module")
def rl_one_process(rl_recipe):
    root, path = rl_recipe
    proc = train([str(path), f"--train.out_dir={root / 'rl-one'}"])
    assert "train done" in proc.stdout
    rl = [r for r in all_rows(root / "rl-one") if r["stage"] == "rl"]
    assert len(rl) == 4 and any(r.get("loss") for r in rl)  # updates ran: the comparison is not vacuous
    return root / "rl-one"


@pytest.mark.parametrize("sp", [2, 1], ids=["sp2", "dp2"])
def test_train_on_two_processes_equals_one(rl_recipe, rl_one_process, sp):
    """Rollouts split over the ranks (per-prompt seeds), the update sharded: the same curriculum
    draws, rewards, losses, grad norms, held-out figures and weights as one process."""
    root, path = rl_recipe
    out = root / f"rl-two-sp{sp}"
    proc = train([str(path), f"--train.out_dir={out}", f"--parallel.sp={sp}"], nproc=2)
    assert proc.stdout.count("train done") == 1 and proc.stdout.count("## Run summary") == 1  # rank 0 speaks
    same_train(rl_one_process, out)


def test_train_resumes_mid_rl_at_another_world_size(rl_recipe, rl_one_process):
    """A 2-process RL checkpoint (step 2: the end of phase 1, carried examples and all) resumed
    on one process finishes as the uninterrupted run."""
    root, path = rl_recipe
    src = root / "rl-two-sp2"
    if not (src / "rl-step-000004").exists():
        train([str(path), f"--train.out_dir={src}", "--parallel.sp=2"], nproc=2)
    out = root / "rl-resumed"
    shutil.copytree(src, out)
    for d in out.glob("rl-step-*"):
        if int(d.name.rsplit("-", 1)[1]) > 2:
            shutil.rmtree(d)
    (out / "latest").write_text("rl-step-000002")
    keep = [line for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2]
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in keep))
    train([str(path), f"--train.out_dir={out}", "--resume"])
    same_train(rl_one_process, out)


def test_a_killed_rank_mid_rl_phase_resumes_on_two_and_on_one(rl_recipe, rl_one_process, tmp_path):
    """`longrl train --nproc 2`: SIGKILL rank 1 once an RL checkpoint inside phase 1 is down;
    the job ends with an error, and --resume on 2 processes and on 1 (from copies of the killed
    run) finish with the uninterrupted run's metrics and weights."""
    import signal
    import time

    root, path = rl_recipe
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "engine.cli", "train", str(path), "--nproc", "2",
                            "--parallel.sp=2", f"--train.out_dir={out}", "--train.save_every=1"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def rl_checkpoint() -> bool:
        latest = out / "latest"
        if not latest.is_file():
            return False
        state = out / latest.read_text().strip() / "trainer.json"
        return state.is_file() and json.loads(state.read_text()).get("stage") == "rl"

    try:
        deadline = time.time() + DEADLINE_S
        while time.time() < deadline and not rl_checkpoint():
            assert job.poll() is None, job.communicate()[1][-2000:]
            time.sleep(0.2)
        assert rl_checkpoint(), "no RL checkpoint before the deadline"
        victims = _worker_pids(1)
        assert victims, "no rank-1 worker found"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        _, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "SIGKILL" in err or "Signal 9" in err or "exitcode" in err, err[-2000:]
    for nproc in (2, 1):
        resumed = tmp_path / f"resumed-on-{nproc}"
        shutil.copytree(out, resumed)
        train([str(path), f"--train.out_dir={resumed}", "--resume", *(["--parallel.sp=2"] if nproc == 2 else [])],
              nproc=nproc)
        same_train(rl_one_process, resumed)
