"""Rule rewards (a table of tricky cases + property tests), the HTTP judge against a real
loopback server, and the hybrid reward."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.rewards import (HttpJudge, HttpJudgeConfig, HybridReward, Judge, JudgeItem, RewardItem,
                            exact_match, extract_answer, extract_choice, normalize, parse_number, parse_verdict,
                            rule_reward, sub_exact_match, token_f1)

# (completion, gold, task, expected reward)
CASES = [
    # extraction
    ("Therefore, the answer is Paris.", "Paris", "qa", 1.0),
    ("therefore, THE ANSWER IS paris", "Paris", "qa", 1.0),                            # case-insensitive
    ("The answer is London. Wait, no. The answer is Paris.", "Paris", "qa", 1.0),      # the last one counts
    ("The answer is Paris. On reflection the answer is London.", "Paris", "qa", 0.0),
    ("Paris is the capital.", "Paris", "qa", 0.0),                                     # no "the answer is"
    ("", "Paris", "qa", 0.0),
    ("Therefore, the answer is (Paris).", "Paris", "qa", 1.0),                         # template parentheses
    ("Therefore, the answer is **Paris**.", "Paris", "qa", 1.0),                       # markdown bold
    ('Therefore, the answer is "Paris"', "Paris", "qa", 1.0),
    ("Therefore, the answer is:\nParis", "Paris", "qa", 0.0),                          # answer must be on that line
    ("Therefore, the answer is: Paris", "Paris", "qa", 1.0),
    ("Therefore, the answer is .", "Paris", "qa", 0.0),                                # empty answer
    # thinking
    ("<think>the answer is London</think>Therefore, the answer is Paris.", "Paris", "qa", 1.0),
    ("<think>Therefore, the answer is Paris</think>I am not sure.", "Paris", "qa", 0.0),
    ("<think>a</think><think>b</think> the answer is Paris", "Paris", "qa", 1.0),       # after the last tag
    # sub-EM and normalisation
    ("Therefore, the answer is the Eiffel Tower", "Eiffel Tower", "qa", 1.0),          # articles
    ("Therefore, the answer is Eiffel Tower, in Paris", "eiffel tower", "qa", 1.0),    # gold inside prediction
    ("Therefore, the answer is Tower", "Eiffel Tower", "qa", 1.0),                     # prediction inside gold
    ("Therefore, the answer is Eiffel-Tower", "Eiffel Tower", "qa", 0.0),              # hyphen removed: eiffeltower
    ("Therefore, the answer is 5.3 million", "5.3 million", "qa", 1.0),
    ("Therefore, the answer is yes", "yes", "qa", 1.0),
    ("Therefore, the answer is no", "yes", "qa", 0.0),
    # gold forms
    ("Therefore, the answer is 1867", "The answer is 1867.", "qa", 1.0),               # gold sentence
    ("Therefore, the answer is Warsaw", ["Krakow", "Warsaw"], "qa", 1.0),             # list of golds
    ("Therefore, the answer is Gdansk", ["Krakow", "Warsaw"], "qa", 0.0),
    ("Therefore, the answer is Warsaw", [], "qa", 0.0),                               # no gold at all
    # numbers (DocMath)
    ("Therefore, the answer is 1,234.5", "1234.5", "math", 1.0),                       # thousands separator
    ("Therefore, the answer is $1,234.50", "1234.5", "math", 1.0),                     # currency
    ("Therefore, the answer is -31.0", "-31", "math", 1.0),
    ("Therefore, the answer is (31)", "-31", "math", 0.0),                             # template parens: 31
    ("Therefore, the answer is 31", "-31", "math", 0.0),                               # sign matters
    ("Therefore, the answer is 12.5%", "0.125", "math", 1.0),                          # percent vs fraction
    ("Therefore, the answer is 0.125", "12.5", "math", 1.0),
    ("Therefore, the answer is 2.5 million", "2500000", "math", 1.0),                  # scale word
    ("Therefore, the answer is 2,500 thousand", "2.5 million", "math", 1.0),
    ("Therefore, the answer is 2500", "2.5", "math", 1.0),                             # units of thousands
    ("Therefore, the answer is 100.1", "100", "math", 1.0),                            # within 0.15%
    ("Therefore, the answer is 100.2", "100", "math", 0.0),                            # outside 0.15%
    ("Therefore, the answer is about 42 dollars", "42.0", "math", 1.0),
    ("Therefore, the answer is unknown", "42", "math", 0.0),
    ("Therefore, the answer is 0", "0", "math", 1.0),
    ("Therefore, the answer is blue", "Blue", "math", 1.0),                            # non-numeric gold: sub-EM
    # multiple choice
    ("The correct answer is (B).", "B", "choice", 1.0),
    ("The correct answer is (b)", "(B)", "choice", 1.0),
    ("The correct answer is C", "B", "choice", 0.0),
    ("I think B. The correct answer is (D).", "D", "choice", 1.0),
    ("The correct answer is (A). No: the correct answer is (C).", "C", "choice", 1.0),
    ("B", "B", "choice", 0.0),                                                          # never committed
    ("<think>The correct answer is (B)</think> The correct answer is (A)", "B", "choice", 0.0),
    ("The correct answer is (B)", "The correct answer is (B).", "choice", 1.0),
]


@pytest.mark.parametrize("completion,gold,task,expected", CASES)
def test_rule_reward_table(completion, gold, task, expected):
    assert rule_reward(completion, gold, task) == expected


def test_table_is_large_and_balanced():
    assert len(CASES) >= 40
    assert {c[2] for c in CASES} == {"qa", "math", "choice"}
    assert 10 < sum(c[3] for c in CASES) < len(CASES) - 10


def test_thinking_required_scores_unclosed_thought_zero():
    assert rule_reward("<think>hmm... the answer is Paris", "Paris", "qa", think="required") == 0.0
    assert rule_reward("the answer is Paris", "Paris", "qa", think="required") == 0.0
    assert rule_reward("<think>x</think>the answer is Paris", "Paris", "qa", think="required") == 1.0
    assert rule_reward("<think>the answer is Paris</think>", "Paris", "qa", think="off") == 1.0


def test_text_scores_by_hand():
    assert normalize("The  Eiffel-Tower, Paris!") == "eiffeltower paris"
    assert exact_match("the Paris", "paris") == 1.0 and exact_match("", "") == 0.0
    assert sub_exact_match("", "paris") == 0.0  # an empty prediction is contained in everything: never a match
    assert token_f1("new york city", "new york") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("boston", "new york") == 0.0


def test_parse_number_forms():
    assert parse_number("−4.5") == -4.5
    assert parse_number("(1,200)") == -1200  # accounting negative (a bare gold; answers lose parens first)
    assert parse_number("$3.2 billion") == 3.2e9
    assert parse_number("5k") == 5000 and parse_number("5 km") == 5
    assert parse_number("no digits") is None


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="task 'essay' unknown"):
        rule_reward("x", "y", "essay")


@settings(max_examples=300, deadline=None)
@given(st.text(), st.one_of(st.text(), st.lists(st.text(), max_size=3)), st.sampled_from(["qa", "math", "choice"]))
def test_parsers_never_raise(text, gold, task):
    assert rule_reward(text, gold, task) in (0.0, 1.0)
    extract_answer(text)
    extract_choice(text)
    parse_number(text)
    normalize(text)
    parse_verdict(text)


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12))
def test_numbers_round_trip(value):
    text = f"Therefore, the answer is {value:,.4f}"
    assert rule_reward(text, repr(round(value, 4)), "math") == 1.0


# ---- the judge over HTTP ---------------------------------------------------------------
class FakeOpenAI:
    """An OpenAI-compatible /chat/completions server on loopback whose behaviour the test
    sets: a list of modes consumed one per request (the last one repeats)."""

    def __init__(self):
        self.modes = ["yes"]
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                    mode = fake.modes.pop(0) if len(fake.modes) > 1 else fake.modes[0]
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    self._answer(mode)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _answer(self, mode):
                if mode in ("429", "500"):
                    self.send_response(int(mode))
                    self.end_headers()
                    return
                if mode == "hang":
                    time.sleep(1.5)
                if mode == "slow":
                    time.sleep(0.2)
                content = {"yes": "Same person. [[YES]]", "no": "Different. [[NO]]", "hang": "[[YES]]",
                           "slow": "ok [[YES]]", "malformed": "I think they match, YES"}.get(mode)
                payload = b"{not json" if mode == "badjson" else json.dumps(
                    {"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_server():
    server = FakeOpenAI()
    yield server
    server.close()


def _judge(server, **kw) -> HttpJudge:
    cfg = dict(base_url=server.url, model="judge-model", api_key_env="LONGRL_TEST_JUDGE_KEY", timeout=1.0,
               max_retries=2, backoff=0.01, concurrency=4)
    cfg.update(kw)
    return HttpJudge(HttpJudgeConfig(**cfg))


ITEM = JudgeItem(question="Who wrote Hamlet?", prediction="Shakespeare", gold="William Shakespeare")


def test_http_judge_answers_and_sends_the_key(fake_server, monkeypatch):
    monkeypatch.setenv("LONGRL_TEST_JUDGE_KEY", "sk-secret-123")
    judge = _judge(fake_server)
    assert judge([ITEM]) == [True]
    assert fake_server.headers[0]["Authorization"] == "Bearer sk-secret-123"
    req = fake_server.requests[0]
    assert req["model"] == "judge-model" and req["temperature"] == 0
    prompt = req["messages"][0]["content"]
    assert "Who wrote Hamlet?" in prompt and "William Shakespeare" in prompt and "[[YES]]" in prompt
    assert "sk-secret" not in repr(judge) and "sk-secret" not in json.dumps(judge.state_dict())
    fake_server.modes = ["no"]
    other = JudgeItem("Who wrote Hamlet?", "Marlowe", "William Shakespeare")
    assert judge([other, ITEM]) == [False, True]  # ITEM comes from the cache
    assert len(fake_server.requests) == 2 and judge.stats.cached == 1


def test_http_judge_retries_429_and_500(fake_server):
    fake_server.modes = ["429", "500", "yes"]
    judge = _judge(fake_server)
    assert judge([ITEM]) == [True]
    assert len(fake_server.requests) == 3


def test_http_judge_gives_up_after_retries(fake_server):
    fake_server.modes = ["500"]
    judge = _judge(fake_server, max_retries=2)
    assert judge([ITEM]) == [None]
    assert len(fake_server.requests) == 3 and judge.stats.unavailable == 1
    assert ("Who wrote Hamlet?", "Shakespeare", "William Shakespeare") not in judge.cache


def test_http_judge_times_out(fake_server):
    fake_server.modes = ["hang"]
    judge = _judge(fake_server, timeout=0.3, max_retries=1)
    started = time.perf_counter()
    assert judge([ITEM]) == [None]
    assert time.perf_counter() - started < 3.0


def test_http_judge_malformed_reply_is_a_counted_no(fake_server):
    fake_server.modes = ["malformed"]
    judge = _judge(fake_server)
    assert judge([ITEM]) == [False]
    assert judge.stats.malformed == 1
    fake_server.modes = ["badjson"]
    assert judge([JudgeItem("q", "a", "b")]) == [None]


def test_http_judge_respects_its_concurrency_limit(fake_server):
    fake_server.modes = ["slow"]
    judge = _judge(fake_server, concurrency=2)
    items = [JudgeItem(f"q{i}", "a", "b") for i in range(8)]
    assert judge(items) == [True] * 8
    assert fake_server.max_in_flight <= 2


def test_parse_verdict_is_strict():
    assert parse_verdict("reasoning... [[YES]]") is True
    assert parse_verdict("[[NO]]\n") is False
    assert parse_verdict("[[YES]] but actually no") is None
    assert parse_verdict("YES") is None and parse_verdict("") is None


# ---- the hybrid reward -----------------------------------------------------------------
class ScriptedJudge(Judge):
    def __init__(self, replies):
        super().__init__()
        self.replies = replies
        self.prompts: list[str] = []

    def _complete(self, prompts):
        self.prompts += prompts
        return [self.replies(p) for p in prompts]


def test_hybrid_asks_the_judge_only_where_the_rule_fails():
    judge = ScriptedJudge(lambda p: "Same. [[YES]]" if "Bard of Avon" in p else "No. [[NO]]")
    hybrid = HybridReward(judge)
    items = [RewardItem("Therefore, the answer is William Shakespeare", "William Shakespeare", "qa", "Who?"),
             RewardItem("Therefore, the answer is the Bard of Avon", "William Shakespeare", "qa", "Who?"),
             RewardItem("Therefore, the answer is Marlowe", "William Shakespeare", "qa", "Who?"),
             RewardItem("no commitment at all", "William Shakespeare", "qa", "Who?")]
    results = hybrid(items)
    assert [r.reward for r in results] == [1.0, 1.0, 0.0, 0.0]
    assert [r.rule for r in results] == [1.0, 0.0, 0.0, 0.0]
    assert len(judge.prompts) == 2  # not for the rule hit, not for the completion with no answer
    assert "document" not in judge.prompts[0].lower()  # the judge never sees the document


def test_hybrid_degrades_to_rule_when_the_judge_is_down(fake_server):
    fake_server.modes = ["500"]
    hybrid = HybridReward(_judge(fake_server, max_retries=1))
    results = hybrid([RewardItem("Therefore, the answer is the Bard", "Shakespeare", "qa", "Who?"),
                      RewardItem("Therefore, the answer is Shakespeare", "Shakespeare", "qa", "Who?")])
    assert [r.reward for r in results] == [0.0, 1.0]
    assert hybrid.metrics()["reward/judge_fallbacks"] == 1


def test_local_judge_runs_a_real_checkpoint(smollm):
    """The embedded model as judge: greedy, batched; whatever it says is parsed strictly."""
    from engine.rewards import LocalJudge
    model, tok = smollm
    judge = LocalJudge(model, tok, max_new_tokens=12, batch_size=2)
    items = [JudgeItem("Who wrote Hamlet?", "Shakespeare", "William Shakespeare"),
             JudgeItem("What is 2 + 2?", "five", "4"),
             JudgeItem("Capital of France?", "Paris", "Paris")]
    verdicts = judge(items)
    assert all(v in (True, False) for v in verdicts)
    assert judge.stats.calls == 3 and judge.stats.malformed + judge.stats.yes <= 3
    assert judge(items) == verdicts and judge.stats.cached == 3  # the second call is served from the cache
