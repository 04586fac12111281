from fastopt.optim.adam import Adam, AdamW
from fastopt.optim.base import FusedOptimizer

__all__ = ["Adam", "AdamW", "FusedOptimizer"]
