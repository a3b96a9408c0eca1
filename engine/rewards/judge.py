"""The LLM judge: is a predicted answer equivalent to the gold answer?

The judge sees the question and the two answers, never the document, as QwenLong-L1's
verifier does, and its reply carries a verdict [[YES]] or [[NO]]; the last one counts. A
reply without one is a NO and is counted as malformed (and not cached: a later call may
get a verdict). A judge that cannot be reached within its per-item deadline returns None
for that item: the hybrid reward then falls back to the rule score and counts it. An HTTP
judge that fails a whole wave of requests (`concurrency` in a row, at least 4, none answered)
is not asked again for `cooldown_s`: a dead endpoint costs one wave's deadline, not every
item's.

Two backends behind one interface, `_complete(conversations) -> replies`:
- `HttpJudge`: an OpenAI-compatible /chat/completions endpoint; the API key is read from
  an environment variable at call time and never stored in the object or logged.
- `LocalJudge`: a generate function (chat messages in, reply texts out) that the caller
  builds on whatever model it holds; this module imports no model code.
Verdicts are cached by (question, prediction, gold); the cache goes into checkpoints.
`build_judge` makes the judge a `[reward]` config section asks for.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Callable

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]  # one chat: [{"role": ..., "content": ...}, ...]

# The verifier prompt released with QwenLong-L1 (github.com/Tongyi-Zhiwen/QwenLong-L1,
# verl/verl/utils/reward_score/docqa.py and docmath.py: GENERAL_ORM_PROMPT is the system
# message, ORM_USER_TEMPLATE the user message, with the policy's answer as Answer 1 and the
# gold as Answer 2; the question is cut out of the policy prompt, so the document stays out).
JUDGE_SYSTEM_PROMPT = """You are an expert in verifying if two answers are the same.
Your input is a problem and two answers, Answer 1 and Answer 2. You need to check if they are equivalent.
Your task is to determine if two answers are equivalent, without attempting to solve the original problem.
Compare the answers to verify they represent identical values or meaning, even when written in different forms or notations.

Your output must follow the following format:
1) Provide an explanation for why the answers are equivalent or not.
2) Then provide your final answer in the form of: [[YES]] or [[NO]]
"""

JUDGE_USER_TEMPLATE = """
Problem: {question}
Answer 1: {prediction}
Answer 2: {gold}
"""

_VERDICT = re.compile(r"\[\[\s*(YES|NO)\s*\]\]", re.IGNORECASE)  # [[YES]], [[ Yes ]], [[no]]


@dataclass(frozen=True)
class JudgeItem:
    question: str
    prediction: str
    gold: str


def parse_verdict(text: str) -> bool | None:
    """The last [[YES]] / [[NO]] of a reply, wherever it stands ("[[YES]]." included), in any case
    and with spaces inside the brackets, or None.

    A reasoning judge's thought, up to `</think>`, is skipped: a marker there is a draft, and
    a reply cut off inside its thought has no verdict yet."""
    text = text or ""
    if "<think>" in text or "</think>" in text:
        end = text.rfind("</think>")
        if end < 0:
            return None
        text = text[end + len("</think>"):]
    found = _VERDICT.findall(text)
    return found[-1].upper() == "YES" if found else None


@dataclass
class JudgeStats:
    """The judge's figures since the last `take()`: one training step's worth."""
    calls: int = 0  # items sent to the backend
    yes: int = 0
    malformed: int = 0  # replies without a verdict (scored NO)
    unavailable: int = 0  # items the backend could not answer in time
    cached: int = 0  # items answered from the cache
    latency_s: float = 0.0  # seconds the items sent waited for their replies, summed

    def take(self) -> dict[str, float]:
        """The step's metrics; the counts start again from zero."""
        answered = self.calls - self.unavailable
        out = {"judge/calls": self.calls, "judge/yes_rate": self.yes / answered if answered else 0.0,
               "judge/failures": self.malformed, "judge/unavailable": self.unavailable,
               "judge/mean_latency_s": self.latency_s / self.calls if self.calls else 0.0,
               "judge/cached": self.cached}
        for f in fields(self):
            setattr(self, f.name, f.default)
        return out


def merge_reward_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Several ranks' reward metrics (HybridReward.metrics) as one process would count them: the
    counts summed, the yes rate weighted by the answered calls, the mean latency by the calls."""
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if key == "judge/yes_rate":
            answered = [p["judge/calls"] - p["judge/unavailable"] for p in parts]
            out[key] = sum(v * a for v, a in zip(values, answered)) / sum(answered) if sum(answered) else 0.0
        elif key == "judge/mean_latency_s":
            calls = [p["judge/calls"] for p in parts]
            out[key] = sum(v * c for v, c in zip(values, calls)) / sum(calls) if sum(calls) else 0.0
        else:
            out[key] = sum(values)
    return out


class Judge:
    """Base: prompting, caching, counting and verdict parsing; backends implement `_complete`."""
    system_prompt = JUDGE_SYSTEM_PROMPT
    user_template = JUDGE_USER_TEMPLATE

    def __init__(self):
        self.cache: dict[tuple[str, str, str], bool] = {}
        self.stats = JudgeStats()

    def _complete(self, conversations: list[Messages]) -> list[str | None]:
        """Replies in order; None where the backend could not answer."""
        raise NotImplementedError

    def messages(self, item: JudgeItem) -> Messages:
        user = self.user_template.format(question=item.question, prediction=item.prediction, gold=item.gold)
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]

    def __call__(self, items: list[JudgeItem]) -> list[bool | None]:
        keys = [(i.question, i.prediction, i.gold) for i in items]
        self.stats.cached += sum(k in self.cache for k in keys)
        todo = [k for k in dict.fromkeys(keys) if k not in self.cache]
        replies = self._complete([self.messages(JudgeItem(*k)) for k in todo]) if todo else []
        fresh = {key: self._record(key, reply) for key, reply in zip(todo, replies)}
        return [self.cache.get(k, fresh.get(k)) for k in keys]

    def _record(self, key: tuple[str, str, str], reply: str | None) -> bool | None:
        """Count a reply and cache its verdict; None (unavailable) and a malformed reply (a NO
        this time) stay out of the cache so that a later call may get a verdict."""
        self.stats.calls += 1
        if reply is None:
            self.stats.unavailable += 1
            return None
        verdict = parse_verdict(reply)
        if verdict is None:
            self.stats.malformed += 1
            return False
        self.stats.yes += verdict
        self.cache[key] = verdict
        return verdict

    # the cache travels with checkpoints
    def state_dict(self) -> dict:
        return {"cache": [[*k, v] for k, v in self.cache.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.cache = {(q, p, g): bool(v) for q, p, g, v in state.get("cache", [])}


@dataclass
class HttpJudgeConfig:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # the *name* of the variable; its value is never stored
    timeout_s: float = 30.0  # per attempt
    retries: int = 2  # attempts per item, the first included; an item costs at most timeout_s × retries
    concurrency: int = 8  # requests in flight
    max_tokens: int = 1024  # the explanation the prompt asks for comes first: 256 cut verdicts off
    backoff: float = 1.0  # seconds before the second attempt, doubled per attempt, with jitter
    cooldown_s: float = 300.0  # after a wave of failures (concurrency items, none answered): not asked for this long

    def __post_init__(self):
        if self.timeout_s <= 0 or self.retries < 1 or self.concurrency < 1 or self.cooldown_s < 0:
            raise ValueError(f"judge: timeout_s > 0, retries >= 1, concurrency >= 1 and cooldown_s >= 0 needed, got "
                             f"{self.timeout_s}, {self.retries}, {self.concurrency}, {self.cooldown_s}")


class _Transient(Exception):
    """A failure worth another attempt: a timeout, a refused or dropped connection, 429, 5xx."""

    def __init__(self, reason: str, retry_after: float = 0.0):
        super().__init__(reason)
        self.retry_after = retry_after


def _retry_after(headers) -> float:
    try:
        return float(headers.get("Retry-After") or 0) if headers else 0.0
    except ValueError:  # an HTTP date: the backoff decides
        return 0.0


class HttpJudge(Judge):
    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
    MIN_ATTEMPT_S = 0.05  # an attempt with less time than this left before the deadline is not made
    MIN_FAILURES = 4  # items in a row without a reply that start a cooldown, at least (else `concurrency`)

    def __init__(self, cfg: HttpJudgeConfig):
        super().__init__()
        self.cfg = cfg
        self._lock = threading.Lock()
        self._failed_in_a_row = 0  # items given up on since the last reply
        self._down_until = 0.0  # time.monotonic() before which nothing is sent

    def __repr__(self) -> str:
        return f"HttpJudge(base_url={self.cfg.base_url!r}, model={self.cfg.model!r})"

    def _complete(self, conversations: list[Messages]) -> list[str | None]:
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            timed = list(pool.map(self._timed_request, conversations))
        self.stats.latency_s += sum(seconds for _, seconds in timed)
        return [reply for reply, _ in timed]

    def _timed_request(self, messages: Messages) -> tuple[str | None, float]:
        if time.monotonic() < self._down_until:  # cooling down: unavailable without a request
            return None, 0.0
        started = time.monotonic()
        reply = self._request(messages)
        with self._lock:
            if reply is not None:
                self._failed_in_a_row = 0
            else:
                self._failed_in_a_row += 1
                if self._failed_in_a_row >= max(self.cfg.concurrency, self.MIN_FAILURES) and self.cfg.cooldown_s > 0:
                    log.warning("judge: %d items in a row without a reply from %s; not asked again for %.0f s "
                                "(rule scores stand meanwhile)", self._failed_in_a_row, self.cfg.base_url,
                                self.cfg.cooldown_s)
                    self._down_until = time.monotonic() + self.cfg.cooldown_s
                    self._failed_in_a_row = 0  # after the cooldown, a fresh count
        return reply, time.monotonic() - started

    def _request(self, messages: Messages) -> str | None:
        """One item's reply, or None once the item's deadline (timeout_s × retries, attempts and
        backoff sleeps together) would pass: a hanging or dead judge slows a step by a bounded
        amount. (The timeout bounds each socket wait; a server trickling bytes could stretch an
        attempt, which OpenAI-compatible servers answering unstreamed requests do not do.)"""
        cfg = self.cfg
        url = cfg.base_url.rstrip("/") + "/chat/completions"
        body = json.dumps({"model": cfg.model, "messages": messages, "temperature": 0,
                           "max_tokens": cfg.max_tokens}).encode()
        deadline = time.monotonic() + cfg.timeout_s * cfg.retries
        for attempt in range(cfg.retries):
            try:
                return self._post(url, body, timeout=min(cfg.timeout_s, deadline - time.monotonic()))
            except _Transient as e:
                failure = e
            delay = max(cfg.backoff * 2 ** attempt * (0.5 + random.random()), failure.retry_after)
            if attempt + 1 == cfg.retries or time.monotonic() + delay + self.MIN_ATTEMPT_S > deadline:
                break
            time.sleep(delay)
        log.warning("judge: giving up on %s after %d attempt(s) (%s)", url, attempt + 1, failure)
        return None

    def _post(self, url: str, body: bytes, timeout: float) -> str | None:
        """The reply's text; None for a failure no retry mends; raises _Transient otherwise."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env)  # read now, never kept
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload = json.loads(resp.read().decode("utf-8"))
            return str(payload["choices"][0]["message"]["content"] or "")
        except urllib.error.HTTPError as e:
            if e.code in self.RETRY_STATUS:
                raise _Transient(f"HTTP {e.code}", _retry_after(e.headers)) from e
            log.warning("judge: HTTP %s from %s (not retried)", e.code, url)
            return None
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, cut replies
            raise _Transient(type(e).__name__) from e
        except (ValueError, KeyError, IndexError, TypeError) as e:  # not an OpenAI-shaped reply
            log.warning("judge: unreadable reply from %s (%s)", url, type(e).__name__)
            return None


class LocalJudge(Judge):
    """A model in this process as judge, through `generate`: chat messages in, reply texts out.

    Greedy decoding and the reply budget are the function's business; taking a function keeps
    model code out of this module and lets the caller choose the model, the batching and the
    device (e.g. a Generator over a second checkpoint)."""

    def __init__(self, generate: Callable[[list[Messages]], list[str]]):
        super().__init__()
        self.generate = generate

    def _complete(self, conversations: list[Messages]) -> list[str | None]:
        started = time.monotonic()
        replies = list(self.generate(conversations))
        if len(replies) != len(conversations):
            raise ValueError(f"judge generate returned {len(replies)} replies for {len(conversations)} chats")
        self.stats.latency_s += (time.monotonic() - started) * len(replies)  # each waited for the whole batch
        return replies


def build_judge(cfg, generate: Callable[[list[Messages]], list[str]] | None = None) -> Judge | None:
    """The judge a `[reward]` section names (cfg.judge: none, http or local), or None.

    For "local" the caller passes `generate` (greedy, at most cfg.judge_max_tokens new
    tokens), since it holds the model; the other judge_* fields configure "http"."""
    if cfg.judge == "none":
        return None
    if cfg.judge == "http":
        if not (cfg.judge_url and cfg.judge_model):
            raise ValueError("judge 'http' needs judge_url and judge_model")
        return HttpJudge(HttpJudgeConfig(base_url=cfg.judge_url, model=cfg.judge_model, api_key_env=cfg.judge_key_env,
                                         timeout_s=cfg.judge_timeout_s, retries=cfg.judge_retries,
                                         concurrency=cfg.judge_concurrency, max_tokens=cfg.judge_max_tokens,
                                         cooldown_s=cfg.judge_cooldown_s))
    if cfg.judge == "local":
        if generate is None:
            raise ValueError("judge 'local' needs a generate function (chat messages in, replies out)")
        return LocalJudge(generate)
    raise ValueError(f"judge {cfg.judge!r} unknown; choose none, http or local")
