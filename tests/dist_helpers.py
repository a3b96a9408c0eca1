"""The multi-process test harness lives in engine.parallel.spawn (the bench uses it too)."""
from engine.parallel.spawn import COLLECTIVE_TIMEOUT_S, free_port, run_ranks  # noqa: F401
