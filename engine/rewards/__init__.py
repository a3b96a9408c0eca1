"""Rewards: rule checks, the LLM judge, and the hybrid max(rule, judge)."""
from .hybrid import HybridReward, RewardItem, RewardResult
from .judge import (JUDGE_SYSTEM_PROMPT, JUDGE_USER_TEMPLATE, HttpJudge, HttpJudgeConfig, Judge, JudgeItem, JudgeStats,
                    LocalJudge, build_judge, parse_verdict)
from .rule import (exact_match, extract_answer, extract_choice, gold_answers, normalize, numbers_match,
                   number_readings, parse_number, rule_reward, sub_exact_match, token_f1)

__all__ = ["rule_reward", "extract_answer", "extract_choice", "gold_answers", "normalize", "exact_match",
           "sub_exact_match", "token_f1", "parse_number", "number_readings", "numbers_match", "Judge", "JudgeItem",
           "JudgeStats", "HttpJudge", "HttpJudgeConfig", "LocalJudge", "build_judge", "parse_verdict",
           "JUDGE_SYSTEM_PROMPT", "JUDGE_USER_TEMPLATE", "HybridReward", "RewardItem", "RewardResult"]
