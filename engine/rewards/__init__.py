"""Rewards: rule checks, the LLM judge, and the hybrid max(rule, judge)."""
from .hybrid import HybridReward, RewardItem, RewardResult
from .judge import HttpJudge, HttpJudgeConfig, Judge, JudgeItem, LocalJudge, parse_verdict
from .rule import (exact_match, extract_answer, extract_choice, gold_answers, normalize, numbers_match,
                   parse_number, rule_reward, sub_exact_match, token_f1)

__all__ = ["rule_reward", "extract_answer", "extract_choice", "gold_answers", "normalize", "exact_match",
           "sub_exact_match", "token_f1", "parse_number", "numbers_match", "Judge", "JudgeItem", "HttpJudge",
           "HttpJudgeConfig", "LocalJudge", "parse_verdict", "HybridReward", "RewardItem", "RewardResult"]
