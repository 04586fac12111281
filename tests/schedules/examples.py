"""At least one instance of every schedule type, shared by the generic tests (values, JSON, repr)."""

from fastopt.schedules import (
    REX,
    WSD,
    WSDS,
    Constant,
    Cosine,
    Cycle,
    InfiniteLR,
    Join,
    Linear,
    Ramp,
    Rewarm,
    Tabulated,
)

EXAMPLES = [
    Constant(0.1),
    Ramp(0.0, 1e-3, 100),
    Ramp(1e-3, 1e-5, 50, shape="exp"),
    Linear(1e-3, 1000, warmup=100, final=1e-5),
    Cosine(1e-3, 1000, warmup=0.1, final=1e-5),
    Cosine(1e-3, 700, period=100, period_mult=2),
    *[
        WSD(3e-4, 1000, warmup=50, decay=0.2, shape=shape, final=3e-5)
        for shape in ("linear", "cosine", "1-sqrt", "exp", "inv")
    ],
    WSDS(1e-3, [300, 600, 1000], warmup=20),
    InfiniteLR(1e-3, 1000),
    InfiniteLR(1e-3, 1000, shape="cosine", constant=2e-4, final=1e-5),
    Rewarm(1e-3, [400, 600], warmup=0.05, final=1e-4),
    REX(1e-3, 1000, warmup=10),
    Tabulated([0.3, 0.2, 0.1]),
    Join([Ramp(0.0, 1e-3, 100), Cosine(1e-3, 900)]),
    Join([Constant(1e-3), Linear(1e-3, 500)], lengths=[200]),
    Cycle(Cosine(1e-3, 300, warmup=30)),
    Cycle(WSD(1e-3, 300), period=250),
    0.5 * WSD(3e-4, 1000),
    Ramp(0.0, 1.0, 100) * Cosine(1e-3, 1000),
]
