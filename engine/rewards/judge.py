"""The LLM judge: is a predicted answer equivalent to the gold answer?

The judge sees the question and the two answers, never the document, and must end its
reply with [[YES]] or [[NO]]. Anything else is a NO and is counted as malformed. A judge
that cannot be reached (after its retries) returns None for that item: the hybrid reward
then falls back to the rule score and counts it.

Two backends behind one interface:
- `HttpJudge`: an OpenAI-compatible /chat/completions endpoint; the API key is read from
  an environment variable at call time and never stored in the object or logged.
- `LocalJudge`: any checkpoint, generated in-process, greedy, batched.
Verdicts are cached by (question, prediction, gold).
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

JUDGE_PROMPT = """You are checking whether a predicted answer to a question means the same as the reference answer.

Question: {question}
Reference answer: {gold}
Predicted answer: {prediction}

Judge only whether the predicted answer is equivalent in meaning to the reference answer (different wording, units or formatting of the same value are fine; a more or less specific answer is not). Explain briefly, then end your reply with exactly [[YES]] or [[NO]]."""


@dataclass(frozen=True)
class JudgeItem:
    question: str
    prediction: str
    gold: str


def parse_verdict(text: str) -> bool | None:
    """True for a reply ending in [[YES]], False for [[NO]], None for anything else."""
    tail = (text or "").rstrip()
    if tail.endswith("[[YES]]"):
        return True
    if tail.endswith("[[NO]]"):
        return False
    return None


@dataclass
class JudgeStats:
    calls: int = 0
    cached: int = 0
    yes: int = 0
    malformed: int = 0
    unavailable: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f"judge/{k}": v for k, v in self.__dict__.items()}


class Judge:
    """Base: caching, counting and verdict parsing; backends implement `_complete`."""

    def __init__(self):
        self.cache: dict[tuple[str, str, str], bool] = {}
        self.stats = JudgeStats()

    def _complete(self, prompts: list[str]) -> list[str | None]:
        """Replies in order; None where the backend could not answer."""
        raise NotImplementedError

    def __call__(self, items: list[JudgeItem]) -> list[bool | None]:
        keys = [(i.question, i.prediction, i.gold) for i in items]
        self.stats.cached += sum(k in self.cache for k in keys)
        todo = [k for k in dict.fromkeys(keys) if k not in self.cache]
        replies = self._complete([JUDGE_PROMPT.format(question=q, prediction=p, gold=g) for q, p, g in todo])
        results: dict[tuple[str, str, str], bool | None] = {}
        for key, reply in zip(todo, replies):
            self.stats.calls += 1
            if reply is None:
                self.stats.unavailable += 1
                results[key] = None  # not cached: a later call may reach the judge
                continue
            verdict = parse_verdict(reply)
            if verdict is None:
                self.stats.malformed += 1
                verdict = False
            self.stats.yes += int(verdict)
            self.cache[key] = verdict
            results[key] = verdict
        return [self.cache.get(k, results.get(k)) for k in keys]

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
    timeout: float = 60.0
    max_retries: int = 3
    backoff: float = 1.0  # seconds, doubled per retry, with jitter
    concurrency: int = 8
    max_tokens: int = 256
    extra_body: dict = field(default_factory=dict)


class HttpJudge(Judge):
    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, cfg: HttpJudgeConfig):
        super().__init__()
        self.cfg = cfg

    def __repr__(self) -> str:
        return f"HttpJudge(base_url={self.cfg.base_url!r}, model={self.cfg.model!r})"

    def _request(self, prompt: str) -> str | None:
        cfg = self.cfg
        body = json.dumps({"model": cfg.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0, "max_tokens": cfg.max_tokens, **cfg.extra_body}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = cfg.base_url.rstrip("/") + "/chat/completions"
        for attempt in range(cfg.max_retries + 1):
            retry_after = None
            try:
                req = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=cfg.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
                return str(payload["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as e:
                if e.code not in self.RETRY_STATUS:
                    log.warning("judge: HTTP %s from %s (not retried)", e.code, url)
                    return None
                retry_after = e.headers.get("Retry-After") if e.headers else None
                reason = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = type(e).__name__
            except (ValueError, KeyError, IndexError, TypeError) as e:  # not an OpenAI-shaped reply
                log.warning("judge: unreadable reply from %s (%s)", url, type(e).__name__)
                return None
            if attempt == cfg.max_retries:
                log.warning("judge: giving up on %s after %d attempts (%s)", url, attempt + 1, reason)
                return None
            delay = cfg.backoff * (2 ** attempt) * (0.5 + random.random())
            if retry_after:
                try:
                    delay = max(delay, min(float(retry_after), 30.0))
                except ValueError:
                    pass
            time.sleep(delay)
        return None

    def _complete(self, prompts: list[str]) -> list[str | None]:
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
            return list(pool.map(self._request, prompts))


class LocalJudge(Judge):
    """A checkpoint as judge, generated greedily in this process (shares nothing with the policy)."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 128, batch_size: int = 8):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def _complete(self, prompts: list[str]) -> list[str | None]:
        from ..data.template import encode_prompt
        from ..rollout import Generator, SamplingParams

        tok = self.tokenizer
        stops = [t for t in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if isinstance(t, int)]
        params = SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0, stop_token_ids=stops)
        generator = Generator(self.model, tok)
        replies: list[str | None] = []
        for i in range(0, len(prompts), self.batch_size):
            ids = [encode_prompt(tok, p) for p in prompts[i:i + self.batch_size]]
            for group in generator.generate(ids, n=1, params=params):
                replies.append(tok.decode(group[0].token_ids, skip_special_tokens=True))
        return replies
