"""fastopt.galore.projector: galore-torch's projectors exactly, the randomized refresh's captured energy, the seeded
random projection, and the moment re-projection's algebra."""
import pytest
import torch

from bench.galore import decaying_gradient, galore_torch
from fastopt.galore import policy
from fastopt.galore import projector as proj

SHAPES = {"tall": (24, 10), "wide": (10, 24), "square": (16, 16)}


def official_projectors(grad, rank, proj_type):
    """galore-torch's GaLoreProjector on one gradient: (its low-rank gradient, its projector matrices as (L, Rt))."""
    projector = galore_torch("galore_projector").GaLoreProjector(rank, update_proj_gap=1, scale=1.0,
                                                                proj_type=proj_type)
    low = projector.project(grad, 0)
    left, right = proj.sides(grad.shape, proj_type)
    matrix = projector.ortho_matrix
    return low, (matrix[0] if left and right else matrix if left else None,
                 matrix[1] if left and right else matrix if right else None)


@pytest.mark.parametrize("rank", [4, 10, 16, 40], ids=lambda r: f"rank{r}")  # up to and past min(m, n)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("proj_type", proj.PROJ_TYPES)
def test_svd_projectors_are_galore_torchs(proj_type, shape, rank):
    grad = torch.randn(shape)
    low, expected = official_projectors(grad, rank, proj_type)
    ours = proj.svd_projectors(grad, rank, proj.sides(shape, proj_type))
    for a, b in zip(ours, expected):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    assert proj.projected_shape(shape, rank, proj_type) == tuple(low.shape)
    assert torch.equal(proj.project(grad, *ours), low)


@pytest.mark.parametrize("proj_type", proj.PROJ_TYPES)
def test_project_back_is_galore_torchs_in_one_addmm(proj_type):
    shape = (24, 10)
    grad, param = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    projector = galore_torch("galore_projector").GaLoreProjector(4, update_proj_gap=1, scale=0.25, proj_type=proj_type)
    low = projector.project(grad, 0)
    update = torch.randn_like(low)
    left, right = proj.sides(shape, proj_type)
    matrix = projector.ortho_matrix
    ours = param.clone()
    proj.project_back_(ours, update, matrix[0] if left and right else matrix if left else None,
                       matrix[1] if left and right else matrix if right else None, alpha=0.25, beta=0.9)
    torch.testing.assert_close(ours, 0.9 * param + projector.project_back(update), rtol=1e-12, atol=1e-12)


def test_reverse_std_on_wide_matrices_at_full_rank():
    """galore-torch fails here (its project_back picks the wrong side when r ≥ rows); ours projects and back."""
    grad = torch.randn(6, 20, dtype=torch.float64)
    left, right = proj.svd_projectors(grad, 8, proj.sides(grad.shape, "reverse_std"))
    assert left is None and right.shape == (6, 20)
    param = torch.zeros_like(grad)
    proj.project_back_(param, proj.project(grad, left, right), left, right, alpha=1.0)
    torch.testing.assert_close(param, grad, rtol=1e-5, atol=1e-6)  # full rank: back to the gradient (fp32 SVD)


SPECTRA = {"power-law 1/i": lambda i: 1 / i, "power-law 1/i^1.5": lambda i: i**-1.5,
           "exponential": lambda i: torch.exp(-i / 16)}


def gradient_with_spectrum(shape, decay, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=g)).Q
    return (u * decay(torch.arange(1, k + 1, dtype=torch.float32))) @ v.T


@pytest.mark.parametrize("spectrum", SPECTRA, ids=SPECTRA.keys())
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("shape", [(384, 160), (160, 384)], ids=["tall", "wide"])
def test_randomized_refresh_keeps_the_svds_energy(shape, proj_type, spectrum):
    """||PᵀG||²/||G||² of the randomized refresh ≥ 0.99 of the exact SVD's: cold, and warm-started from the projector
    of an earlier gradient (as in training, where it is warm-started from the previous refresh)."""
    keep = proj.sides(shape, proj_type)
    earlier = gradient_with_spectrum(shape, SPECTRA[spectrum], seed=1)
    grad = gradient_with_spectrum(shape, SPECTRA[spectrum], seed=0) + 0.3 * earlier
    generator = torch.Generator().manual_seed(0)
    exact = proj.captured_energy(grad, *proj.svd_projectors(grad, 24, keep))
    cold = proj.randomized_projectors(grad, 24, keep, (None, None), generator)
    warm = proj.randomized_projectors(grad, 24, keep, proj.randomized_projectors(earlier, 24, keep, (None, None),
                                                                                   generator), generator)
    for projectors in (cold, warm):
        for matrix, expected in zip(projectors, proj.projector_shapes(shape, 24, proj_type)):
            assert (matrix is None) == (expected is None)
            if matrix is not None:
                assert matrix.shape == expected
                gram = matrix.T @ matrix if matrix.shape[0] > matrix.shape[1] else matrix @ matrix.T
                torch.testing.assert_close(gram, torch.eye(24), atol=1e-5, rtol=0)  # orthonormal
        assert proj.captured_energy(grad, *projectors) >= 0.99 * exact


def test_randomized_refresh_of_a_bench_like_gradient():
    grad = decaying_gradient(512, 256)
    keep = proj.sides(grad.shape, "std")
    exact = proj.captured_energy(grad, *proj.svd_projectors(grad, 32, keep))
    ours = proj.randomized_projectors(grad, 32, keep, (None, None), torch.Generator().manual_seed(0))
    assert proj.captured_energy(grad, *ours) >= 0.99 * exact


def test_randomized_refresh_at_full_rank_is_exact():
    grad = torch.randn(20, 8, dtype=torch.float64)
    _, right = proj.randomized_projectors(grad, 8, (False, True), (None, None), torch.Generator().manual_seed(0))
    assert proj.captured_energy(grad, None, right) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("proj_type", ["std", "full"])
def test_random_projection_is_a_function_of_its_seed(proj_type):
    keep = proj.sides((30, 12), proj_type)
    a = proj.random_projectors((30, 12), 5, keep, 1234, torch.device("cpu"), torch.float32)
    b = proj.random_projectors((30, 12), 5, keep, 1234, torch.device("cpu"), torch.float32)
    c = proj.random_projectors((30, 12), 5, keep, 1235, torch.device("cpu"), torch.float32)
    for x, y, z in zip(a, b, c):
        if x is not None:
            assert torch.equal(x, y) and not torch.equal(x, z)
            gram = x.T @ x if x.shape[0] > x.shape[1] else x @ x.T
            torch.testing.assert_close(gram, torch.eye(5), atol=1e-5, rtol=0)
    assert policy._seed(3, 200) != policy._seed(4, 200) != policy._seed(3, 400)
    assert 0 <= policy._seed(2**40, 2**40) < 2**63


def test_reproject_carries_moments_into_the_new_basis():
    """m ← Mₗ·m·Mᵣ: exact for a gradient in both subspaces; v ← squared maps: exact for a signed permutation."""
    orthonormal = lambda rows, cols: torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64)).Q  # noqa: E731
    old = (orthonormal(12, 5), orthonormal(9, 5).T)
    grad = old[0] @ torch.randn(5, 5, dtype=torch.float64) @ old[1]  # inside both subspaces
    rotation = orthonormal(5, 5)
    new = (old[0] @ rotation, rotation.T @ old[1])  # the same subspaces, another basis
    basis = proj.change_of_basis(old, new)
    torch.testing.assert_close(proj.reproject(proj.project(grad, *old), basis, squared=False),
                               proj.project(grad, *new))
    flip = torch.diag(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64))[[2, 0, 1, 4, 3]]
    flipped = (old[0] @ flip.T, flip @ old[1])
    v = proj.project(grad, *old).square()
    torch.testing.assert_close(proj.reproject(v, proj.change_of_basis(old, flipped), squared=True),
                               proj.project(grad, *flipped).square())
