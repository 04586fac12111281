from fastopt.optim.adam import Adam, AdamW
from fastopt.optim.base import FusedOptimizer
from fastopt.optim.spam import SPAM, StableSPAM

__all__ = ["Adam", "AdamW", "FusedOptimizer", "SPAM", "StableSPAM"]
