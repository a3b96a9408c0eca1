"""Rule rewards (a table of tricky cases + property tests), the HTTP judge against a real
loopback server, and the hybrid reward."""
from __future__ import annotations

import ast
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.rewards import (HttpJudge, HttpJudgeConfig, HybridReward, Judge, JudgeItem, LocalJudge, RewardItem,
                            build_judge, exact_match, extract_answer, extract_choice, normalize, numbers_match,
                            number_readings, parse_number, parse_verdict, rule_reward, sub_exact_match, token_f1)
import engine.rewards.judge as judge_module

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
    ("Therefore, the answer is:\nParis", "Paris", "qa", 1.0),                          # the next line
    ("Therefore, the answer is:\n\n**Paris**", "Paris", "qa", 1.0),                    # first non-empty line
    ("Therefore, the answer is:\n\nLondon\nParis", "Paris", "qa", 0.0),                # only that one line
    ("Therefore, the answer is: Paris", "Paris", "qa", 1.0),
    ("Therefore, the answer is .", "Paris", "qa", 0.0),                                # empty answer
    ("The answer is Paris.\nNote that the answer isn't London.", "Paris", "qa", 1.0),  # "isn't" commits to nothing
    ("The answer is Paris.\nNote that the answer isn't London.", "London", "qa", 0.0),
    ("The answer is Paris.\nThe answer is not London.", "London", "qa", 0.0),          # nor does "is not" ...
    ("The answer is not guilty", "not guilty", "qa", 1.0),                             # ... unless it is all
    # thinking
    ("<think>the answer is London</think>Therefore, the answer is Paris.", "Paris", "qa", 1.0),
    ("<think>Therefore, the answer is Paris</think>I am not sure.", "Paris", "qa", 0.0),
    ("<think>a</think><think>b</think> the answer is Paris", "Paris", "qa", 1.0),       # after the last tag
    ("<think>Maybe the answer is Paris. Hmm, but", "Paris", "qa", 0.0),                # a thought never closed
    ("The answer is Paris <think>or is it", "Paris", "qa", 1.0),                       # ... after the answer
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
    ("Therefore, the answer is $5 million", "5", "math", 1.0),                         # table in millions
    ("Therefore, the answer is $5,000,000", "5", "math", 1.0),
    ("Therefore, the answer is 5", "5000000", "math", 1.0),                            # scale word dropped
    ("Therefore, the answer is 5.004 billion", "5", "math", 1.0),                      # x10^9, within 0.15%
    ("Therefore, the answer is 6 million", "5", "math", 0.0),                          # scaled, still wrong
    ("Therefore, the answer is 50", "5", "math", 0.0),                                 # x10 is no unit change
    ("Therefore, the answer is 0.00001", str(0.00001), "math", 1.0),                   # a float gold prints 1e-05
    ("Therefore, the answer is 1.2 × 10^6", "1200000", "math", 1.0),                   # a power of ten
    ("Therefore, the answer is 1.2e6", "1.2", "math", 1.0),                            # x10^6: a unit change
    ("Therefore, the answer is 1.2e5", "1.2", "math", 0.0),                            # x10^5 is none
    ("Therefore, the answer is 3/4", "0.75", "math", 1.0),                             # a fraction
    ("Therefore, the answer is 1,234/5,678", "0.21733", "math", 1.0),                 # separators in both
    ("Therefore, the answer is 24/7", "24", "math", 1.0),                              # a/b read as a alone too
    ("Therefore, the answer is 2019/20", "2019", "math", 1.0),
    ("Therefore, the answer is 3/4", "4", "math", 0.0),
    # multiple choice
    ("The correct answer is (B).", "B", "choice", 1.0),
    ("The correct answer is (b)", "(B)", "choice", 0.0),                               # letters are uppercase
    ("the answer is (C)", "C", "choice", 1.0),
    ("After reading, the answer is B.", "b", "choice", 1.0),                            # gold parsed leniently
    ("So the answer is a clear one: the document says so.", "A", "choice", 0.0),      # an article, not (A)
    ("The correct answer is **(D)**", "(d)", "choice", 1.0),
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
    assert parse_number("2.5E-3") == pytest.approx(0.0025) and parse_number("2 x 10^(-3)") == pytest.approx(0.002)
    assert parse_number("1/0") == 1 and parse_number("3/4/2020") == 3  # a date is no fraction
    assert number_readings("-3/4") == [-0.75, -3] and number_readings("3/1,000") == [0.003, 3]


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


def test_extract_answer_reads_the_first_non_empty_line():
    assert extract_answer("Therefore, the answer is:\n\n**Paris**") == "Paris"
    assert extract_answer("The answer is\n  \n(Paris).\nMore text") == "Paris"
    assert extract_answer("Therefore, the answer is:\n\n") is None


def test_choice_letters_are_uppercase_in_parentheses_or_alone():
    assert extract_choice("the answer is a clear one") is None
    assert extract_choice("the answer is (c)") is None
    assert extract_choice("the answer is (C)") == "C"
    assert extract_choice("The correct answer is (D).") == "D"
    assert extract_choice("the answer is B") == "B" and extract_choice("the answer is B.") == "B"
    assert extract_choice("the answer is Berlin") is None


def test_scaled_numbers_match_within_tolerance_only():
    assert numbers_match(5e6, 5) and numbers_match(5, 5e6) and numbers_match(5e9, 5e3)
    assert numbers_match(12.5, 0.125) and numbers_match(0.125, 12.5)  # percent vs fraction
    assert not numbers_match(6e6, 5) and not numbers_match(5.01e6, 5) and not numbers_match(-5e6, 5)
    assert not numbers_match(5e4, 5)  # x10^4 is no unit change


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
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the judge gave up on a hanging request
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
    cfg = dict(base_url=server.url, model="judge-model", api_key_env="LONGRL_TEST_JUDGE_KEY", timeout_s=1.0,
               retries=3, backoff=0.01, concurrency=4)
    cfg.update(kw)
    return HttpJudge(HttpJudgeConfig(**cfg))


ITEM = JudgeItem(question="Who wrote Hamlet?", prediction="Shakespeare", gold="William Shakespeare")


def test_http_judge_answers_and_sends_the_key(fake_server, monkeypatch):
    monkeypatch.setenv("LONGRL_TEST_JUDGE_KEY", "sk-secret-123")
    judge = _judge(fake_server)
    assert judge([ITEM]) == [True]
    assert fake_server.headers[0]["Authorization"] == "Bearer sk-secret-123"
    req = fake_server.requests[0]
    assert req["model"] == "judge-model" and req["temperature"] == 0 and req["max_tokens"] == 1024
    assert "sk-secret" not in repr(judge) and "sk-secret" not in json.dumps(judge.state_dict())
    assert "sk-secret" not in repr(judge.cfg)
    fake_server.modes = ["no"]
    other = JudgeItem("Who wrote Hamlet?", "Marlowe", "William Shakespeare")
    assert judge([other, ITEM]) == [False, True]  # ITEM comes from the cache
    assert len(fake_server.requests) == 2 and judge.stats.cached == 1


def test_judge_prompt_is_the_papers_system_and_user_messages(fake_server):
    """QwenLong-L1's verifier prompt: a system message with the rules and a user message
    with the question and the two answers; no document."""
    judge = _judge(fake_server)
    judge([ITEM])
    messages = fake_server.requests[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "equivalent" in messages[0]["content"] and "[[YES]] or [[NO]]" in messages[0]["content"]
    user = messages[1]["content"]
    assert "Problem: Who wrote Hamlet?" in user
    assert "Answer 1: Shakespeare" in user and "Answer 2: William Shakespeare" in user
    assert "document" not in json.dumps(messages).lower()


def test_http_judge_retries_429_and_500(fake_server):
    fake_server.modes = ["429", "500", "yes"]
    judge = _judge(fake_server)
    assert judge([ITEM]) == [True]
    assert len(fake_server.requests) == 3


def test_http_judge_gives_up_after_its_attempts(fake_server):
    fake_server.modes = ["500"]
    judge = _judge(fake_server, retries=2)
    assert judge([ITEM]) == [None]
    assert len(fake_server.requests) == 2 and judge.stats.unavailable == 1
    assert ("Who wrote Hamlet?", "Shakespeare", "William Shakespeare") not in judge.cache


def test_a_hanging_judge_costs_at_most_timeout_times_retries(fake_server):
    fake_server.modes = ["hang"]  # the server sleeps 1.5 s before answering
    judge = _judge(fake_server, timeout_s=0.3, retries=3, backoff=0.5)
    started = time.perf_counter()
    assert judge([ITEM]) == [None]
    assert time.perf_counter() - started <= 0.3 * 3 + 0.5  # the backoff sleeps fit inside the deadline
    assert judge.stats.unavailable == 1


def test_a_down_judge_never_sleeps_past_its_deadline():
    with socket.socket() as s:  # a port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = HttpJudge(HttpJudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout_s=0.2,
                                      retries=3, backoff=5.0))
    started = time.perf_counter()
    assert judge([ITEM]) == [None]
    assert time.perf_counter() - started <= 0.2 * 3 + 0.3


def test_a_dead_judge_is_left_alone_for_its_cooldown():
    """concurrency items in a row without a reply: the rest of the batch, and the next batches
    until the cooldown ends, are unavailable at once, without a request."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = HttpJudge(HttpJudgeConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout_s=0.2,
                                      retries=1, concurrency=2, cooldown_s=60.0))
    sent = []
    real = judge._request
    judge._request = lambda messages: sent.append(1) or real(messages)
    items = [JudgeItem(f"q{i}", "a", "b") for i in range(12)]
    assert judge(items) == [None] * 12 and judge([JudgeItem("q", "a", "c")]) == [None]
    # 4 in a row at the least (concurrency 2), one more possibly on its way
    assert 4 <= len(sent) <= 5 and judge.stats.unavailable == 13
    judge._down_until = 0.0  # the cooldown is over: asked again, and counted afresh (no new cooldown at once)
    n = len(sent)
    judge([JudgeItem("q", "a", f"d{i}") for i in range(3)])
    assert len(sent) == n + 3


def test_http_judge_malformed_reply_is_a_counted_no(fake_server):
    fake_server.modes = ["malformed"]
    judge = _judge(fake_server)
    assert judge([ITEM]) == [False]
    assert judge.stats.malformed == 1 and not judge.cache  # asked again next time
    fake_server.modes = ["badjson"]
    assert judge([JudgeItem("q", "a", "b")]) == [None]


def test_http_judge_respects_its_concurrency_limit(fake_server):
    fake_server.modes = ["slow"]
    judge = _judge(fake_server, concurrency=2, timeout_s=10.0)  # about concurrency, not deadlines: no time-outs
    items = [JudgeItem(f"q{i}", "a", "b") for i in range(8)]
    assert judge(items) == [True] * 8
    assert fake_server.max_in_flight <= 2


def test_judge_stats_are_taken_per_step(fake_server):
    fake_server.modes = ["yes", "no", "malformed", "500"]  # in order: one worker, one attempt each
    judge = _judge(fake_server, concurrency=1, retries=1)
    items = [JudgeItem(f"q{i}", "a", "b") for i in range(4)]
    assert judge(items) == [True, False, False, None]
    assert judge(items[:1]) == [True]
    step = judge.stats.take()
    assert step["judge/calls"] == 4 and step["judge/cached"] == 1
    assert step["judge/yes_rate"] == pytest.approx(1 / 3)  # of the three verdicts
    assert step["judge/failures"] == 1 and step["judge/unavailable"] == 1
    assert step["judge/mean_latency_s"] > 0
    assert judge.stats.take() == {"judge/calls": 0, "judge/yes_rate": 0.0, "judge/failures": 0,
                                  "judge/unavailable": 0, "judge/mean_latency_s": 0.0, "judge/cached": 0}


def test_parse_verdict_takes_the_last_marker_anywhere():
    assert parse_verdict("reasoning... [[YES]]") is True
    assert parse_verdict("They match. [[YES]].") is True
    assert parse_verdict("[[NO]]\n") is False
    assert parse_verdict("[[NO]] ... actually [[YES]]") is True
    assert parse_verdict("[[YES]] on reflection [[NO]], final.") is False
    assert parse_verdict("YES") is None and parse_verdict("") is None and parse_verdict("[YES]") is None
    assert parse_verdict("Equivalent. [[Yes]]") is True and parse_verdict("[[ YES ]]") is True
    assert parse_verdict("[[yes]] then [[ no ]]") is False


def test_parse_verdict_ignores_an_unfinished_thought():
    assert parse_verdict("<think>maybe [[YES]]</think>No, they differ. [[NO]]") is False
    assert parse_verdict("<think>maybe [[YES]] but wait") is None  # cut off while thinking
    assert parse_verdict("<think>ok</think>no marker here") is None


# ---- the hybrid reward -----------------------------------------------------------------
class ScriptedJudge(Judge):
    """Replies by a function of the user message; None plays an unreachable judge."""

    def __init__(self, replies):
        super().__init__()
        self.replies = replies
        self.conversations: list[list[dict]] = []

    def _complete(self, conversations):
        self.conversations += conversations
        return [self.replies(c[-1]["content"]) for c in conversations]


def _scripted(user: str):
    if "Bard of Avon" in user:
        return "Same person. [[YES]]"
    return None if "Kit" in user else "No. [[NO]]"


SHAKESPEARE = [RewardItem("Therefore, the answer is William Shakespeare", "William Shakespeare", "qa", "Who?"),
               RewardItem("Therefore, the answer is the Bard of Avon", "William Shakespeare", "qa", "Who?"),
               RewardItem("Therefore, the answer is Marlowe", "William Shakespeare", "qa", "Who?"),
               RewardItem("Therefore, the answer is Kit Marlowe", "William Shakespeare", "qa", "Who?"),
               RewardItem("no commitment at all", "William Shakespeare", "qa", "Who?")]


def test_hybrid_asks_the_judge_only_where_the_rule_fails():
    judge = ScriptedJudge(_scripted)
    hybrid = HybridReward(judge)
    results = hybrid(SHAKESPEARE)
    assert [r.reward for r in results] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert [r.rule for r in results] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert [r.judge for r in results] == [None, True, False, None, None]
    assert len(judge.conversations) == 3  # not for the rule hit, not for the completion with no answer
    assert "document" not in json.dumps(judge.conversations).lower()  # the judge never sees the document


def test_hybrid_metrics_are_per_step():
    hybrid = HybridReward(ScriptedJudge(_scripted))
    hybrid(SHAKESPEARE)
    step = hybrid.metrics()
    assert step["reward/judge_rescued"] == 1 and step["reward/judge_fallbacks"] == 1
    assert step["judge/calls"] == 3 and step["judge/unavailable"] == 1 and step["judge/yes_rate"] == 0.5
    again = hybrid.metrics()
    assert again["reward/judge_rescued"] == 0 and again["reward/judge_fallbacks"] == 0 and again["judge/calls"] == 0
    assert HybridReward().metrics() == {"reward/judge_fallbacks": 0, "reward/judge_rescued": 0}


def test_hybrid_state_carries_the_judge_cache():
    first = HybridReward(ScriptedJudge(_scripted))
    first(SHAKESPEARE)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    second = HybridReward(ScriptedJudge(_scripted))
    second.load_state_dict(state)
    assert [r.reward for r in second(SHAKESPEARE)] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert len(second.judge.conversations) == 1  # only the unavailable item is asked again
    assert HybridReward().state_dict() == {}
    HybridReward().load_state_dict(state)  # no judge: nothing to restore


def test_hybrid_degrades_to_rule_when_the_judge_is_down(fake_server):
    fake_server.modes = ["500"]
    hybrid = HybridReward(_judge(fake_server, retries=2))
    results = hybrid([RewardItem("Therefore, the answer is the Bard", "Shakespeare", "qa", "Who?"),
                      RewardItem("Therefore, the answer is Shakespeare", "Shakespeare", "qa", "Who?")])
    assert [r.reward for r in results] == [0.0, 1.0]
    assert hybrid.metrics()["reward/judge_fallbacks"] == 1


def test_build_judge_from_the_reward_section():
    base = dict(judge="none", judge_url="", judge_model="", judge_key_env="OPENAI_API_KEY", judge_timeout_s=5.0,
                judge_retries=2, judge_concurrency=3, judge_max_tokens=512, judge_cooldown_s=7.0)
    assert build_judge(SimpleNamespace(**base)) is None
    http = build_judge(SimpleNamespace(**{**base, "judge": "http", "judge_url": "http://127.0.0.1:1/v1",
                                          "judge_model": "m", "judge_key_env": "MY_KEY"}))
    assert isinstance(http, HttpJudge)
    assert (http.cfg.base_url, http.cfg.model, http.cfg.api_key_env) == ("http://127.0.0.1:1/v1", "m", "MY_KEY")
    assert (http.cfg.timeout_s, http.cfg.retries, http.cfg.concurrency, http.cfg.max_tokens,
            http.cfg.cooldown_s) == (5.0, 2, 3, 512, 7.0)
    local = build_judge(SimpleNamespace(**{**base, "judge": "local"}), generate=lambda convs: ["[[YES]]"] * len(convs))
    assert isinstance(local, LocalJudge) and local([ITEM]) == [True]
    with pytest.raises(ValueError, match="generate"):
        build_judge(SimpleNamespace(**{**base, "judge": "local"}))
    with pytest.raises(ValueError, match="judge_url"):
        build_judge(SimpleNamespace(**{**base, "judge": "http"}))
    with pytest.raises(ValueError, match="'oracle'"):
        build_judge(SimpleNamespace(**{**base, "judge": "oracle"}))


def test_judge_module_imports_no_rollout_or_data():
    tree = ast.parse(Path(judge_module.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if "rollout" in m or "data" in m.split(".")], imported


def test_local_judge_runs_a_real_checkpoint(smollm):
    """The embedded model as judge, wired as `longrl train` wires `[reward] judge = "local"`:
    greedy through the rollout engine, stopping by the model's stop rule within
    judge_max_tokens; each verdict is exactly what the strict parser reads in the reply."""
    from engine.config import load_config
    from engine.train import build_reward
    model, tok = smollm
    cfg = load_config(None, ["--reward.judge=local", "--reward.judge_path=smollm2-135m-instruct",
                             "--reward.judge_max_tokens=12", "--model.device=cpu"])
    reward = build_reward(cfg, "auto")
    judge = reward.judge
    assert isinstance(judge, LocalJudge)
    replies = []
    inner = judge._complete
    judge._complete = lambda convs: replies.extend(inner(convs)) or replies[-len(convs):]
    items = [JudgeItem("Who wrote Hamlet?", "Shakespeare", "William Shakespeare"),
             JudgeItem("What is 2 + 2?", "five", "4"),
             JudgeItem("Capital of France?", "Paris", "Paris")]
    verdicts = judge(items)
    assert len(replies) == 3 and all(0 < len(tok.encode(r, add_special_tokens=False)) <= 13 for r in replies)
    assert verdicts == [bool(parse_verdict(r)) for r in replies]
    assert judge.stats.calls == 3 and judge.stats.malformed == sum(parse_verdict(r) is None for r in replies)
    # verdicts are cached (a second call is served from the cache); malformed replies are not
    assert set(judge.cache) == {(i.question, i.prediction, i.gold) for i, r in zip(items, replies)
                                if parse_verdict(r) is not None}


def test_reward_metrics_of_several_ranks_count_as_one_process():
    """Each rank judges its share of a step's prompts: the logged figures are every rank's, the
    counts summed and the rates weighted (rank 0's alone was logged before)."""
    from engine.rewards.judge import merge_reward_metrics
    a = {"reward/judge_rescued": 2, "judge/calls": 4, "judge/unavailable": 0, "judge/yes_rate": 0.5,
         "judge/mean_latency_s": 1.0, "judge/cached": 1}
    b = {"reward/judge_rescued": 1, "judge/calls": 6, "judge/unavailable": 2, "judge/yes_rate": 0.25,
         "judge/mean_latency_s": 2.0, "judge/cached": 0}
    got = merge_reward_metrics([a, b])
    assert got == {"reward/judge_rescued": 3, "judge/calls": 10, "judge/unavailable": 2,
                   "judge/yes_rate": pytest.approx((0.5 * 4 + 0.25 * 4) / 8),
                   "judge/mean_latency_s": pytest.approx((1.0 * 4 + 2.0 * 6) / 10), "judge/cached": 1}
    assert merge_reward_metrics([{"judge/calls": 0, "judge/unavailable": 0, "judge/yes_rate": 0.0}] * 2) == \
        {"judge/calls": 0, "judge/unavailable": 0, "judge/yes_rate": 0.0}
