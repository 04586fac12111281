"""fastopt: drop-in torch.optim optimizers on fused CPU (C++) and GPU (Triton) kernels."""
from fastopt import galore
from fastopt._ext import cpu_isa, set_cpu_isa
from fastopt.optim import SPAM, Adam, AdamW, FusedOptimizer, GaLoreAdamW, StableSPAM

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "FusedOptimizer", "GaLoreAdamW", "SPAM", "StableSPAM", "__version__", "cpu_isa", "galore",
           "set_cpu_isa"]
