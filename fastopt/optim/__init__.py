from fastopt.optim.adam import Adam, AdamW
from fastopt.optim.base import FusedOptimizer
from fastopt.optim.galore import GaLoreAdamW
from fastopt.optim.spam import SPAM, StableSPAM

__all__ = ["Adam", "AdamW", "FusedOptimizer", "GaLoreAdamW", "SPAM", "StableSPAM"]
