"""RL algorithms on tensors of rewards, log-probs and masks (no models here)."""
from .advantages import SCALES, grpo_advantages
from .dapo import (AEPOController, DynamicSampler, ShortBatchError, group_has_variance, overlong_filter,
                   overlong_penalty)
from .policy_loss import AGGREGATIONS, GRPOLossConfig, aggregation_weights, policy_loss

__all__ = ["grpo_advantages", "SCALES", "policy_loss", "aggregation_weights", "AGGREGATIONS", "GRPOLossConfig",
           "DynamicSampler", "ShortBatchError", "group_has_variance", "overlong_penalty", "overlong_filter",
           "AEPOController"]
