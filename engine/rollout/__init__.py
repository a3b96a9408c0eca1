"""In-process generation: the paged rollout engine (Generator)."""
from .block_manager import BlockManager, NoFreeBlocks
from .engine import Generator, RolloutStats
from .paged import CacheConfig
from .sampling import Completion, SamplingParams
from .scheduler import CacheTooSmall

__all__ = ["Generator", "SamplingParams", "Completion", "CacheConfig", "BlockManager", "NoFreeBlocks",
           "CacheTooSmall", "RolloutStats"]
