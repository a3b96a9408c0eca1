"""The hybrid reward of QwenLong-L1: max(rule-based check, LLM judge).

The rule runs on every completion; the judge is asked only where the rule scored below 1
(an exact-enough answer needs no second opinion), and only about the extracted answer. A
judge that is unavailable within its deadline leaves the rule score in place and is
counted: training never stops for it. `metrics()` gives a step's figures and starts the
counts again; `state_dict()` carries the judge's cache into checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass

from .judge import Judge, JudgeItem
from .rule import extract_answer, extract_choice, gold_answers, rule_reward


@dataclass
class RewardItem:
    completion: str
    gold: str | list[str]
    task: str = "qa"
    question: str = ""


@dataclass
class RewardResult:
    reward: float
    rule: float
    judge: bool | None  # None: not asked, or unavailable
    answer: str | None
    judge_asked: bool = False  # the judge was asked (judge None then: it gave no verdict)


class HybridReward:
    def __init__(self, judge: Judge | None = None, *, think: str = "auto", judge_tasks=("qa", "math")):
        self.judge = judge
        self.think = think
        self.judge_tasks = tuple(judge_tasks)
        self.judge_fallbacks = 0  # items left at the rule score because the judge was unavailable
        self.judge_rescued = 0  # items whose reward the judge raised above the rule's

    def __call__(self, items: list[RewardItem]) -> list[RewardResult]:
        results = []
        ask: list[tuple[int, JudgeItem]] = []
        for i, item in enumerate(items):
            rule = rule_reward(item.completion, item.gold, item.task, think=self.think)
            if item.task == "choice":
                answer = extract_choice(item.completion, self.think)
            else:
                answer = extract_answer(item.completion, self.think)
            results.append(RewardResult(reward=rule, rule=rule, judge=None, answer=answer))
            golds = gold_answers(item.gold)
            if self.judge is not None and rule < 1 and answer and golds and item.task in self.judge_tasks:
                ask.append((i, JudgeItem(question=item.question, prediction=answer, gold=" | ".join(golds))))
        if ask:
            verdicts = self.judge([j for _, j in ask])
            for (i, _), verdict in zip(ask, verdicts):
                results[i].judge, results[i].judge_asked = verdict, True
                if verdict is None:
                    self.judge_fallbacks += 1
                elif verdict:
                    results[i].reward = 1.0  # max(rule, judge): the judge is only asked where rule < 1
                    self.judge_rescued += 1
        return results

    def metrics(self) -> dict[str, float]:
        """The figures since the last call (one step's), the judge's included; counts restart."""
        out = {"reward/judge_fallbacks": self.judge_fallbacks, "reward/judge_rescued": self.judge_rescued}
        self.judge_fallbacks = self.judge_rescued = 0
        if self.judge is not None:
            out.update(self.judge.stats.take())
        return out

    def state_dict(self) -> dict:
        return {"judge": self.judge.state_dict()} if self.judge is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.judge is not None and "judge" in state:
            self.judge.load_state_dict(state["judge"])
