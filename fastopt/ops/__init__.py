"""The op surface: one function per fused op, taking lists of tensors, dispatching to reference / cpu / triton."""
from fastopt.ops._backends import BACKENDS, resolve
from fastopt.ops.adam import adam_step
from fastopt.ops.spam import spam_step, stable_spam_step

__all__ = ["BACKENDS", "adam_step", "resolve", "spam_step", "stable_spam_step"]
