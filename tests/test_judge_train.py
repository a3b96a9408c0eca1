"""The judge in training: `longrl train` with `[reward] judge = "http"` against a loopback
OpenAI-compatible server, as the issue "the judge in training" accepts it.

1. A YES judge rescues wrong-but-extracted answers: judge/calls and reward/judge_rescued
   show up in the RL rows of metrics.jsonl, and the rescued reward is what trains.
2. A hung judge costs a bounded time per step; the items fall back to the rule score, are
   counted, and training goes on.
3. The verdict cache goes into the checkpoint (trainer.json: trainer.reward) and a resumed
   run answers the same items from it without asking the server.
4. The API key travels as `Authorization: Bearer <key>` and nowhere else (metrics,
   checkpoints, logs, console).

How the policy gets answers worth judging. The judge is asked only where the rule scores
below 1 *and* an answer was extracted ("the answer is ..."); a tiny random model never
writes that phrase. So the rollout's Generator (engine.train.rl.Generator, the class the
GRPO trainer builds) is swapped for a subclass that runs the real generation and then
overwrites each sample's tokens with a scripted completion that depends only on the
prompt's question and the sample index:
    sample 0, 1: "Therefore, the answer is <a wrong town>."  rule 0, extracted -> judged
    sample 2:    "I am not sure."                             rule 0, nothing extracted
    sample 3:    "Therefore, the answer is <gold>."           rule 1 -> never judged
This is independent of the reward (nothing in engine.rewards / engine.train.build_reward is
touched), deterministic, and it keeps every group's rewards varied so that dynamic sampling
keeps the groups and the update runs. The update then trains on these very tokens, which is
consistent: the rewarded completion is the one whose log-probs the loss sees.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import tiny_model_with_tokenizer

import engine.train.rl as rl_module
from engine.cli import main
from engine.config import load_config
from engine.data import load_records
from engine.rollout import Completion, Generator
from engine.train import latest_checkpoint, run_pipeline

RL_DATA = "synthetic:n=2,tokens=40-80,seed=2,kinds=lookup"  # 2 records: both drawn every step
WRONG = ["Atlantis Prime", "Nowhere Vale"]  # never (sub-)matches a synthetic town name
KEY_ENV = "LONGRL_TEST_TRAIN_JUDGE_KEY"
YES_REPLY = "Both name the same town. [[YES]]"


# ---- a loopback OpenAI-compatible judge -----------------------------------------------
class LoopbackJudge:
    """/v1/chat/completions on 127.0.0.1 (a free port) in a thread. mode "yes" answers
    [[YES]] to everything; mode "hang" accepts the request and never answers (until close)."""

    def __init__(self, mode: str = "yes"):
        self.mode = mode
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                if fake.mode == "hang":
                    fake.release.wait(60)  # never answers while the test runs
                    return
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": YES_REPLY}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def judge_server():
    servers = []

    def start(mode="yes"):
        servers.append(LoopbackJudge(mode))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


# ---- the policy's completions -----------------------------------------------------------
def scripted_generator(golds: dict[str, str]):
    """A Generator that samples for real, then writes the module docstring's completions."""

    class ScriptedGenerator(Generator):
        def generate(self, prompts, n=1, params=None):
            outs = super().generate(prompts, n=n, params=params)
            tok = self.tokenizer
            scripted = []
            for prompt, comps in zip(prompts, outs):
                text = tok.decode(prompt, skip_special_tokens=True)
                question = [q for q in golds if q in text]
                assert len(question) == 1, "the prompt names exactly one known question"
                gold = golds[question[0]]
                row = []
                for j, comp in enumerate(comps):
                    reply = (f"Therefore, the answer is {WRONG[j]}." if j < 2 else
                             "I am not sure." if j == 2 else f"Therefore, the answer is {gold}.")
                    ids = tok.encode(reply, add_special_tokens=False)
                    row.append(Completion(ids, [0.0] * len(ids), "stop"))
                scripted.append(row)
            return scripted
    return ScriptedGenerator


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm):
    return tiny_model_with_tokenizer(tmp_path_factory.mktemp("judge-train") / "tiny", smollm[1])


@pytest.fixture
def scripted_policy(monkeypatch):
    golds = {r.question: r.answers[0] for r in load_records(RL_DATA)}
    monkeypatch.setattr(rl_module, "Generator", scripted_generator(golds))
    return golds


RECIPE = f"""
# CI-sized: one RL phase on 2 synthetic records, no SFT, no held-out sets
[train]
lr = 1e-4
token_budget = 2048
save_every = 1

[rl]
data = ["{RL_DATA}"]
phases = [{{ name = "only", max_input_tokens = 400, steps = 1 }}]
group_size = 4
batch_prompts = 2
max_new_tokens = 4
temperature = 1.0
top_p = 1.0
think = "off"

[reward]
judge = "http"
judge_url = "http://127.0.0.1:9/v1"  # a placeholder: the tests point it at their server
judge_model = "judge-model"
judge_key_env = "{KEY_ENV}"
"""


def write_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "judge_ci.toml"
    path.write_text(RECIPE)
    return path


def train_args(tmp_path, model_dir, server, out, *extra):
    return ["train", str(write_recipe(tmp_path)), f"--model.path={model_dir}", f"--train.out_dir={out}",
            f"--reward.judge_url={server.url}", *extra]


def rl_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("stage") == "rl"]


# ---- 1. a YES judge rescues answers in training --------------------------------------
def test_train_with_http_judge_rescues_extracted_wrong_answers(tmp_path, tiny_model_dir, judge_server,
                                                               scripted_policy):
    """Fails when the judge is not wired into training (build_reward ignoring [reward]): no
    judge/* figures, nothing rescued, no request at the server, accuracy at the rule's 0.25."""
    server = judge_server("yes")
    out = tmp_path / "run"
    assert main(train_args(tmp_path, tiny_model_dir, server, out)) == 0
    (row,) = rl_rows(out)
    asked = 2 * len(WRONG)  # 2 prompts × the 2 wrong-but-extracted samples, all distinct
    assert row["judge/calls"] == asked == server.count()
    assert row["judge/yes_rate"] == 1.0 and row["judge/unavailable"] == 0 and row["judge/failures"] == 0
    assert row["reward/judge_rescued"] == asked and row["reward/judge_fallbacks"] == 0
    assert row["judge/mean_latency_s"] > 0
    # max(rule, judge) is the reward that trains: 3 of 4 samples solved (rule alone: 1 of 4)
    assert row["accuracy"] == pytest.approx(0.75) and row["reward/mean"] == pytest.approx(0.75)
    assert row["dynamic/kept_groups"] == 2 and math.isfinite(row["loss"])
    # the judge saw the question and the extracted answer, with the gold as Answer 2
    user = [m["content"] for r in server.requests for m in r["messages"] if m["role"] == "user"]
    for question, gold in scripted_policy.items():
        for wrong in WRONG:
            assert any(f"Problem: {question}" in u and f"Answer 1: {wrong}" in u and f"Answer 2: {gold}" in u
                       for u in user)
    assert all(r["model"] == "judge-model" for r in server.requests)


# ---- 2. a hung judge: bounded step, rule-score fallback, training goes on -------------
def test_train_with_hung_judge_falls_back_within_the_deadline(tmp_path, tiny_model_dir, judge_server,
                                                              scripted_policy):
    server = judge_server("hang")
    out = tmp_path / "run"
    timeout, retries, concurrency = 0.3, 2, 2
    started = time.perf_counter()
    assert main(train_args(tmp_path, tiny_model_dir, server, out, f"--reward.judge_timeout_s={timeout}",
                           f"--reward.judge_retries={retries}", f"--reward.judge_concurrency={concurrency}",
                           "--reward.judge_cooldown_s=0",  # asked every step (the cooldown: test_rewards.py)
                           '--rl.phases=[{name = "only", max_input_tokens = 400, steps = 2}]')) == 0
    wall = time.perf_counter() - started
    rows = rl_rows(out)
    assert [r["step"] for r in rows] == [1, 2]  # training went on after a step with no judge
    for row in rows:
        asked = row["judge/calls"]
        assert asked == 2 * len(WRONG)  # nothing cached: an unavailable verdict is asked again
        assert row["judge/unavailable"] == asked and row["reward/judge_fallbacks"] == asked
        assert row["reward/judge_rescued"] == 0 and row["judge/yes_rate"] == 0.0
        # the rule score stands: only the gold sample is solved, and the update still runs
        assert row["accuracy"] == pytest.approx(0.25) and math.isfinite(row["loss"])
        # the bound: each item costs at most timeout × retries, `concurrency` of them at a time
        bound = asked * timeout * retries / concurrency
        assert timeout <= row["time/reward"] <= bound + 0.5, row["time/reward"]
        assert row["time/step"] <= bound + 3.0, row["time/step"]  # + the tiny model's rollout and update
    assert server.count() >= 2 * 2 * len(WRONG)  # the judge was really asked, every step
    state = json.loads((latest_checkpoint(out) / "trainer.json").read_text())
    assert state["trainer"]["reward"]["judge"]["cache"] == []  # unavailable verdicts are not cached
    assert wall < 60


# ---- 3. the cache in checkpoints, answered from on resume ------------------------------
def test_judge_cache_is_checkpointed_and_answers_a_resumed_run(tmp_path, tiny_model_dir, judge_server,
                                                               scripted_policy):
    server = judge_server("yes")
    out = tmp_path / "run"
    cfg = load_config(write_recipe(tmp_path), [f"--model.path={tiny_model_dir}", f"--train.out_dir={out}",
                                               f"--reward.judge_url={server.url}",
                                               '--rl.phases=[{name = "only", max_input_tokens = 400, steps = 2}]'])
    run_pipeline(cfg, progress=False, stop_after=1)  # a run killed after step 1 (save_every = 1)
    asked = server.count()
    assert asked == 2 * len(WRONG)
    state = json.loads((latest_checkpoint(out) / "trainer.json").read_text())
    assert state["trainer"]["step"] == 1
    cache = state["trainer"]["reward"]["judge"]["cache"]
    assert sorted((q, p, g) for q, p, g, _ in cache) == sorted(
        (q, w, g) for q, g in scripted_policy.items() for w in WRONG)
    assert all(v is True for *_, v in cache)

    run_pipeline(cfg, resume=True, progress=False)  # a new process would start with an empty cache
    assert server.count() == asked  # step 2 asked the server nothing
    rows = rl_rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    resumed = rows[1]
    assert resumed["judge/calls"] == 0 and resumed["judge/cached"] == 2 * len(WRONG)
    assert resumed["reward/judge_rescued"] == 2 * len(WRONG)  # the cached verdicts still rescue
    assert resumed["accuracy"] == pytest.approx(0.75)
    final = json.loads((latest_checkpoint(out) / "trainer.json").read_text())
    assert final["trainer"]["step"] == 2 and len(final["trainer"]["reward"]["judge"]["cache"]) == len(cache)


# ---- 4. the API key goes to the server and nowhere else --------------------------------
def test_judge_key_is_sent_as_bearer_and_never_written(tmp_path, tiny_model_dir, judge_server, scripted_policy,
                                                       monkeypatch, caplog, capsys):
    key = "sk-longrl-test-9f3c1e7a"
    monkeypatch.setenv(KEY_ENV, key)
    caplog.set_level(logging.DEBUG)
    server = judge_server("yes")
    out = tmp_path / "run"
    assert main(train_args(tmp_path, tiny_model_dir, server, out)) == 0
    assert server.count() > 0
    assert all(h.get("Authorization") == f"Bearer {key}" for h in server.headers)
    printed = capsys.readouterr()
    assert key not in caplog.text and key not in printed.out and key not in printed.err
    metrics = (out / "metrics.jsonl").read_text()
    assert "judge/calls" in metrics and key not in metrics
    trainer_json = (latest_checkpoint(out) / "trainer.json").read_text()
    assert '"reward"' in trainer_json and key not in trainer_json
    # nor anywhere else the run wrote (checkpoints, model files, TensorBoard, lengths cache)
    leaked = [p for p in out.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert leaked == []
