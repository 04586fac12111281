"""fastopt: drop-in torch.optim optimizers on fused CPU (C++) and GPU (Triton) kernels."""
from fastopt.optim import SPAM, Adam, AdamW, FusedOptimizer, StableSPAM

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "FusedOptimizer", "SPAM", "StableSPAM", "__version__"]
