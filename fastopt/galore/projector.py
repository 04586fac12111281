"""GaLore projectors as pure functions on tensors (docs/algorithms.md#galore; Zhao et al. 2024).

A projection of an m×n gradient G keeps a rank-r subspace on one side, the other, or both:

    left  L (m×r, orthonormal columns):   R = Lᵀ·G          back: L·U
    right Rt (r×n, orthonormal rows):     R = G·Rtᵀ         back: U·Rt
    both  ("full"):                       R = Lᵀ·G·Rtᵀ      back: L·U·Rt

Which side ``proj_type`` keeps is galore-torch's choice: "std" projects the smaller dimension away (tall m ≥ n:
right; wide: left), "reverse_std" the other one, "left" / "right" a fixed side, "full" both. r is capped at
min(m, n), as galore-torch's SVD slices are. Projectors come from one of three refreshes:

- :func:`svd_projectors`: the top-r singular vectors of G, galore-torch's projector exactly (its SVD runs in float32
  whatever G's dtype, and so does this one: singular vectors are defined up to sign, and an SVD in another dtype
  may flip some, which changes the trajectory when moments are kept across a refresh);
- :func:`randomized_projectors`: subspace iteration (a randomized range finder warm-started from the previous
  projector, a couple of power iterations, QR between products, Rayleigh–Ritz at the end; Halko et al. 2011,
  GaLore 2): a few products of G with an n×(r+16) matrix instead of an SVD of G, and the same top singular vectors
  on decaying spectra (≥ 0.99 of the SVD's captured energy; tests/galore/test_projector.py);
- :func:`random_projectors`: a seeded random orthonormal basis (GoLore / APOLLO style); the seed alone
  determines it.
"""
from __future__ import annotations

from typing import Protocol

import torch

from fastopt.ops.common import compute_dtype

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
POWER_ITERATIONS = 2  # randomized refresh: rounds of Y = orth(G·Q), Z = Gᵀ·Y
OVERSAMPLE = 16       # randomized refresh: extra basis vectors beyond r (fewer when r is near min(m, n))

Projectors = tuple  # (left m×r or None, right r×n or None)


def sides(shape: tuple[int, int], proj_type: str) -> tuple[bool, bool]:
    """(keeps a left projector, keeps a right projector) for a gradient of this shape."""
    m, n = shape
    if proj_type == "std":
        return (False, True) if m >= n else (True, False)
    if proj_type == "reverse_std":
        return (True, False) if m >= n else (False, True)
    return {"left": (True, False), "right": (False, True), "full": (True, True)}[proj_type]


def effective_rank(shape: tuple[int, int], rank: int) -> int:
    return min(rank, *shape)


def projected_shape(shape: tuple[int, int], rank: int, proj_type: str) -> tuple[int, int]:
    """Shape of the low-rank gradient R (and of the optimizer's moments)."""
    left, right = sides(shape, proj_type)
    r = effective_rank(shape, rank)
    return (r if left else shape[0], r if right else shape[1])


def projector_shapes(shape: tuple[int, int], rank: int, proj_type: str) -> Projectors:
    left, right = sides(shape, proj_type)
    r = effective_rank(shape, rank)
    return ((shape[0], r) if left else None, (r, shape[1]) if right else None)


def project(grad: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, *,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """R = Lᵀ·G·Rtᵀ (either factor absent when its side is not kept): one matmul, two for "full"; into ``out`` if
    given (a reused buffer: no allocation)."""
    if right is None:
        return torch.mm(left.T, grad, out=out)
    return torch.mm(grad if left is None else left.T @ grad, right.T, out=out)


def project_back_(param: torch.Tensor, update: torch.Tensor, left: torch.Tensor | None,
                  right: torch.Tensor | None, *, alpha: float, beta: float = 1.0) -> None:
    """param ← beta·param + alpha·(L·U·Rt), in place: one BLAS call (addmm), no full-size temporary ("full" first
    forms the m×r product L·U)."""
    if left is not None and right is not None:
        param.addmm_(left @ update, right, beta=beta, alpha=alpha)
    elif left is not None:
        param.addmm_(left, update, beta=beta, alpha=alpha)
    else:
        param.addmm_(update, right, beta=beta, alpha=alpha)


def captured_energy(grad: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> float:
    """||R||² / ||G||²: the fraction of the gradient's energy the projection keeps (1.0 for full rank)."""
    g = grad.double()
    r = project(g, None if left is None else left.double(), None if right is None else right.double())
    return float(r.square().sum() / g.square().sum())


def svd_projectors(grad: torch.Tensor, rank: int, keep: tuple[bool, bool]) -> Projectors:
    """galore-torch's projectors: U[:, :r] and Vh[:r] of the thin SVD of G in float32, cast to G's dtype."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    left, right = keep
    return (u[:, :rank].to(grad.dtype) if left else None, vh[:rank].to(grad.dtype) if right else None)


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


class RowShards(Protocol):
    """A gradient whose rows are split over ranks (a sharded param): how the randomized refresh combines them."""

    total: int  # rows of the whole gradient

    def mine(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole matrix with the gradient's rows."""

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The whole matrix, on every rank, from each rank's rows (one all-reduce of its size)."""

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the ranks, in place (one all-reduce)."""


def randomized_projectors(grad: torch.Tensor, rank: int, keep: tuple[bool, bool], previous: Projectors,
                          generator: torch.Generator, *, iters: int = POWER_ITERATIONS,
                          oversample: int = OVERSAMPLE, rows: RowShards | None = None) -> Projectors:
    """Approximate top-r singular vectors by subspace iteration on the side(s) kept (Halko et al. 2011, Alg. 4.4
    with Rayleigh–Ritz).

    The right basis Q (n×k, k = r + oversample) starts from the previous projector when there is one, topped up
    with Gaussian columns, and goes through ``iters`` rounds of Y = orth(G·Q), Z = Gᵀ·Y (Q = orth(Z) between rounds).
    Then G ≈ Y·Zᵀ, and the SVD of the n×k matrix Z gives G's approximate singular vectors on both sides, ordered
    and aligned as the exact SVD's are. A left-only projection runs on Gᵀ. Cost: 2·iters products of G with a k-column
    matrix, 2·iters − 1 QRs and one SVD of n×k, against an SVD of the whole of G.

    ``rows``: ``grad`` holds this rank's rows of the gradient only (a sharded param; ``previous`` is whole). Each
    product with G is then this rank's part, made whole by one all-reduce of its m×k or n×k result; the rest is the
    same computation on every rank, and the projectors returned are whole."""
    left, right = keep
    transpose = left and not right  # track the kept side as the right side of Gᵀ
    g = grad.to(compute_dtype(grad))
    g = g.T if transpose else g
    warm = previous[1] if not transpose else None if previous[0] is None else previous[0].T  # rows of the old basis
    m, n = g.shape
    if rows is not None:  # the whole gradient's shape; the sharded rows are g's columns when transposed
        m, n = (m, rows.total) if transpose else (rows.total, n)

    def times(x):  # G·x, whole
        if rows is None:
            return g @ x
        return rows.sum(g @ rows.mine(x)) if transpose else rows.gather(g @ x)

    def transposed_times(y):  # Gᵀ·y, whole
        if rows is None:
            return g.T @ y
        return rows.gather(g.T @ y) if transpose else rows.sum(g.T @ rows.mine(y))

    r = effective_rank((m, n), rank)
    k = min(r + oversample, m, n)
    columns = [] if warm is None else [warm.to(g.dtype).T]
    fresh = k - (0 if warm is None else warm.shape[0])
    if fresh > 0:
        columns.append(torch.randn(n, fresh, generator=generator, device=g.device, dtype=g.dtype))
    q = _orthonormal(torch.cat(columns, dim=1))
    for i in range(iters):
        y = _orthonormal(times(q))
        z = transposed_times(y)
        if i + 1 < iters:
            q = _orthonormal(z)
    u, _, vh = torch.linalg.svd(z, full_matrices=False)  # z = U·S·Vh, so G ≈ Y·zᵀ = (Y·Vhᵀ)·S·Uᵀ
    right_rows = u[:, :r].T.to(grad.dtype)  # r×n: approximate top right singular vectors of g
    if transpose:
        return right_rows.T.contiguous(), None
    return ((y @ vh[:r].T).to(grad.dtype) if left else None), right_rows.contiguous()


def random_projectors(shape: tuple[int, int], rank: int, keep: tuple[bool, bool], seed: int,
                      device: torch.device, dtype: torch.dtype) -> Projectors:
    """A random orthonormal basis for each kept side, a deterministic function of ``seed`` on ``device``
    (Gaussian draws from a generator seeded with it, orthonormalized by QR; the left factor is drawn first)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    r = effective_rank(shape, rank)
    compute = compute_dtype(dtype)
    draw = lambda rows: _orthonormal(  # noqa: E731
        torch.randn(rows, r, generator=generator, device=device, dtype=compute)).to(dtype)
    left, right = keep
    return (draw(shape[0]) if left else None), (draw(shape[1]).T.contiguous() if right else None)


def change_of_basis(old: Projectors, new: Projectors) -> Projectors:
    """(Mₗ, Mᵣ) with R_new ≈ Mₗ·R_old·Mᵣ for a gradient inside both subspaces: Mₗ = L_newᵀ·L_old,
    Mᵣ = Rt_old·Rt_newᵀ (None for a side that is not kept)."""
    (l_old, r_old), (l_new, r_new) = old, new
    return (None if l_new is None else l_new.T @ l_old), (None if r_new is None else r_old @ r_new.T)


def reproject(moment: torch.Tensor, basis: Projectors, *, squared: bool) -> torch.Tensor:
    """A low-rank moment carried to the new subspace: m ← Mₗ·m·Mᵣ for a signed (first) moment; for a second moment
    v ← (Mₗ∘Mₗ)·v·(Mᵣ∘Mᵣ), the variances of the re-projected coordinates if the old ones were independent
    (exact when the new basis permutes or flips the old one; never negative)."""
    m_left, m_right = basis
    if squared:
        m_left = None if m_left is None else m_left.square()
        m_right = None if m_right is None else m_right.square()
    x = moment if m_left is None else m_left.to(moment.dtype) @ moment
    return x if m_right is None else x @ m_right.to(moment.dtype)
