"""Evaluation on long-document QA: the runner behind `longrl eval`, pass@k, reports."""
from .passk import pass_at_k
from .runner import markdown, run_eval, summarize

__all__ = ["pass_at_k", "run_eval", "summarize", "markdown"]
