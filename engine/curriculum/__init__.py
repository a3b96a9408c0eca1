"""Curriculum-guided phased RL (QwenLong-L1, Wan et al., arXiv 2505.17667, section 3):

- phases by input length: phase k trains on examples with L(k−1) < length ≤ L(k)
  (the paper: 20K, then 60K tokens), each for its own number of steps;
- difficulty-aware retrospective sampling: at the end of a phase, examples the policy still
  fails (mean group reward at or below a threshold; the paper keeps those at 0) are carried
  into the next phase. They join its epochs: each epoch takes a draw without replacement,
  weighted by difficulty = 1 / mean reward (capped; a zero mean is the hardest), sized so they
  make up `carry_ratio` of the epoch (at most the whole pool), spread through the epoch order;
- task-balanced sampling (QwenLong-L1.5, optional): with an id -> task (or data source) map,
  each batch is split evenly across the groups, each group drawing from its own epochs.

All state (positions, random generators, difficulties, carried examples) round-trips
through state_dict / load_state_dict, so a resumed run draws the same next samples.
"""
from .phases import Phase, phase_members
from .retrospective import DifficultyTracker, PhaseSampler, carry_over

__all__ = ["Phase", "phase_members", "DifficultyTracker", "PhaseSampler", "carry_over"]
