"""GaLore (Zhao et al. 2024): optimizer states in a low-rank subspace of each 2-D gradient, refreshed every
``update_proj_gap`` steps. Every fastopt optimizer runs it for the param groups that carry a ``rank``
(fastopt/optim/base.py); this package holds the math that does not depend on an optimizer:

- ``projector``: pure functions on tensors: which side a projection keeps, project / project back, and the three
  refreshes (exact SVD, randomized subspace iteration, seeded random);
- ``policy``: the group options and their checks, the per-parameter state, and when a refresh happens;
- ``backward``: :func:`step_in_backward`, per-parameter stepping during the backward pass.
"""
from fastopt.galore.backward import BackwardStepping, step_in_backward
from fastopt.galore.policy import DEFAULTS, MOMENTS, REFRESH
from fastopt.galore.projector import (PROJ_TYPES, captured_energy, project, project_back_, projected_shape,
                                      random_projectors, randomized_projectors, sides, svd_projectors)

__all__ = ["BackwardStepping", "DEFAULTS", "MOMENTS", "PROJ_TYPES", "REFRESH", "captured_energy", "project",
           "project_back_", "projected_shape", "random_projectors", "randomized_projectors", "sides",
           "step_in_backward", "svd_projectors"]
