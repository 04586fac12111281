"""fastopt: drop-in torch.optim optimizers on fused CPU (C++) and GPU (Triton) kernels."""
from fastopt import galore
from fastopt.optim import SPAM, Adam, AdamW, FusedOptimizer, GaLoreAdamW, StableSPAM

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "FusedOptimizer", "GaLoreAdamW", "SPAM", "StableSPAM", "__version__", "galore"]
