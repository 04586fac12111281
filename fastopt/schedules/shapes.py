"""How a phase moves from value `a` to value `b` as its progress `p` runs from 0 to 1.

Each shape is one formula written for both Python floats (`xp=math`) and numpy arrays (`xp=numpy`), so a
schedule's per-step `__call__` and its vectorized `values()` evaluate the same expression.
"""

from __future__ import annotations


def linear(a, b, p, xp):
    return a + (b - a) * p


def cosine(a, b, p, xp):
    """Half a cosine wave (Loshchilov & Hutter, SGDR)."""
    return b + (a - b) * 0.5 * (1 + xp.cos(xp.pi * p))


def one_minus_sqrt(a, b, p, xp):
    """b + (a - b)(1 - sqrt p): the WSD cooldown of Hägele et al. 2024 (epfml/schedules-and-scaling)."""
    return b + (a - b) * (1 - xp.sqrt(p))


def exponential(a, b, p, xp):
    """a·(b/a)^p: geometric interpolation; never reaches 0, so needs a, b > 0."""
    return a * (b / a) ** p


def inverse(a, b, p, xp):
    """1 / (p/b + (1 - p)/a): harmonic interpolation; needs a, b > 0."""
    return 1 / (p / b + (1 - p) / a)


def inverse_sqrt(a, b, p, xp):
    """a + (b - a)·h(p)/h(1), h(p) = 1/sqrt(1 + 10p) - 1: the cooldown of Ibrahim et al. 2024's infinite LR
    schedule (timescale 10, as in the authors' code)."""
    return a + (b - a) * (1 / xp.sqrt(1 + 10 * p) - 1) / _H1


_H1 = 1 / 11**0.5 - 1  # h(1) of inverse_sqrt


def rex(a, b, p, xp):
    """b + (a - b)·(1 - p)/(1/2 + (1 - p)/2): the REX profile (Chen et al. 2022)."""
    q = 1 - p
    return b + (a - b) * q / (0.5 + 0.5 * q)


SHAPES = {
    "linear": linear,
    "cosine": cosine,
    "1-sqrt": one_minus_sqrt,
    "exp": exponential,
    "inv": inverse,
    "inv-sqrt": inverse_sqrt,
    "rex": rex,
}

# Shapes that interpolate multiplicatively: both ends must be > 0.
POSITIVE_ONLY = ("exp", "inv")
