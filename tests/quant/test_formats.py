"""The block formats: maps and codes identical to torchao's (bit for bit), every backend identical to the
reference, round-trip error within the map's resolution, zero blocks, and tails that break blocking."""
import warnings

import pytest
import torch

import fastopt
from fastopt.ops.quant import dequantize, quantize
from fastopt.quant import FORMATS, SIGNED_4BIT, UNSIGNED_4BIT, decode, encode, zeros
from fastopt.quant.formats import QuantFormat, nearest_codes
from tests.conftest import cpu_isas

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchao.optim import quant_utils as torchao_quant

FMT_IDS = [f.name for f in FORMATS.values()]
BACKENDS = [("cpu", isa) for isa in cpu_isas()] + [("triton", None)]


def torchao_map(fmt):
    if fmt is UNSIGNED_4BIT:
        return torch.linspace(0, 1, 17)[1:]  # torchao's 4-bit second-moment map: linear, no zero
    return torch.tensor(torchao_quant.create_dynamic_map(fmt.qmap[0] < 0, 3 if fmt.bits == 4 else 7, fmt.bits))


def blocks_with_spread(fmt, blocks=64, seed=0):
    """Random blocks whose magnitudes span many decades (as optimizer moments do), signed as the format."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(blocks, fmt.block, generator=g) * torch.logspace(-8, 1, blocks)[:, None]
    x = x * torch.rand(blocks, fmt.block, generator=g) ** 4
    return (x if fmt.qmap[0] < 0 else x.abs()).reshape(-1)


def unpack(codes, fmt):
    return torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1) if fmt.bits == 4 else codes


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FMT_IDS)
def test_map_equals_torchao(fmt):
    assert torch.equal(fmt.table(), torchao_map(fmt).float())
    assert len(fmt.qmap) == 2**fmt.bits and list(fmt.qmap) == sorted(fmt.qmap)


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FMT_IDS)
def test_codes_equal_torchao_quantizer(fmt):
    x = blocks_with_spread(fmt)
    scaled, scales = torchao_quant.scale_tensor(x.clone(), fmt.block)
    search = torchao_quant.quantize_4bit_with_qmap if fmt.bits == 4 else torchao_quant.quantize_8bit_with_qmap
    want = search(scaled, fmt.table())
    codes, ours = encode(x, fmt)
    assert torch.equal(ours, scales)
    assert torch.equal(unpack(codes, fmt), want)


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=[f"{b}-{i}" if i else b for b, i in BACKENDS])
@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FMT_IDS)
@pytest.mark.parametrize("n", [1, 127, 128, 129, 255, 257, 4097, 100_003])
def test_backends_encode_and_decode_like_the_reference(backend, isa, fmt, n):
    fastopt.set_cpu_isa(isa or "auto")
    try:
        x = blocks_with_spread(fmt, blocks=-(-n // fmt.block), seed=n)[:n]
        want_codes, want_scales = encode(x, fmt)
        codes, scales = quantize(x, fmt, backend=backend)
        assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)
        assert torch.equal(dequantize(codes, scales, fmt, n, backend=backend), decode(codes, scales, fmt, n))
    finally:
        fastopt.set_cpu_isa("auto")


def order(y):
    """float32 -> int64 that sorts like the floats, adjacent floats one apart."""
    i = y.view(torch.int32).long()
    return torch.where(i < 0, -(i & 0x7FFFFFFF), i)


def value(k):
    """The inverse of order."""
    return torch.where(k < 0, (-k) | -0x80000000, k).int().view(torch.float32)


def code_boundaries(fmt):
    """Every y where the reference's code steps up (the smallest float whose code exceeds k), by bisection on
    the float order: the places where a faster encoder (a search over thresholds, arithmetic) could be off by one."""
    table = fmt.table()
    ks = torch.arange(2**fmt.bits - 1)
    lo = order(torch.full((ks.numel(),), -2.0))
    hi = order(torch.full((ks.numel(),), 2.0))
    while (hi - lo > 1).any():
        mid = lo + (hi - lo) // 2
        above = nearest_codes(value(mid), table) > ks
        hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
    return value(hi)


def test_unsigned_4bit_boundaries_are_linear():
    """The premise of the CPU's arithmetic 4-bit encoder (csrc linear_code): the code steps at (2k+3)/32."""
    assert torch.equal(code_boundaries(UNSIGNED_4BIT), (2 * torch.arange(15) + 3) / 32)


@pytest.mark.parametrize("backend,isa", BACKENDS, ids=[f"{b}-{i}" if i else b for b, i in BACKENDS])
@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FMT_IDS)
def test_backends_agree_at_every_code_boundary(backend, isa, fmt):
    """Values on, and 1, 2, 3, 4, 8, ... 2^14 ulps either side of, each boundary between two codes (the CPU's 8-bit
    encoder computes codes arithmetically except within a margin around each boundary, hundreds of ulps wide: both
    sides of its edge are in there): in a block of scale 1 (y = x exactly) and in blocks of other scales (x/scale
    rounds), plus zeros, signed zeros, tiny and extreme values."""
    boundaries = order(code_boundaries(fmt))
    offsets = torch.tensor([0, 1, 2, 3] + [2**i for i in range(2, 15)])
    near = value((boundaries[:, None] + torch.cat([offsets, -offsets])).view(-1))
    y = torch.cat([near, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, -1.0, 1.0])]).clamp(-1, 1)
    if fmt.qmap[0] >= 0:
        y = torch.cat([y.abs(), y])  # an unsigned format still encodes negative inputs like the reference
    x = torch.cat([y, y * 3.7e-3, y * 6.1e4, y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(0))]])
    fastopt.set_cpu_isa(isa or "auto")
    try:
        want_codes, want_scales = encode(x, fmt)
        codes, scales = quantize(x, fmt, backend=backend)
        assert torch.equal(scales, want_scales)
        assert torch.equal(unpack(codes, fmt), unpack(want_codes, fmt))
    finally:
        fastopt.set_cpu_isa("auto")


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FMT_IDS)
def test_cpu_isas_agree_on_blocks_with_inf_and_nan(isa, fmt):
    """A block holding NaN has a NaN scale on every ISA (its values are then encoded as they are: y = ±inf must get
    the threshold search's code, which the 8-bit arithmetic encoder cannot compute); ±inf alone gives y = NaN."""
    inf, nan = float("inf"), float("nan")
    specials = [[inf, nan], [nan, inf], [-inf, nan], [nan, -inf], [inf], [-inf], [inf, -inf], [nan]]
    rows = []
    for special in specials:
        row = torch.linspace(-0.9, 0.9, fmt.block)
        row[3: 3 + len(special)] = torch.tensor(special)
        rows.append(row)
    x = torch.cat(rows)
    want_codes, want_scales = [], []
    for chosen in ("scalar", isa):
        fastopt.set_cpu_isa(chosen)
        try:
            codes, scales = quantize(x, fmt, backend="cpu")
        finally:
            fastopt.set_cpu_isa("auto")
        want_codes.append(codes), want_scales.append(scales)
    assert torch.equal(want_codes[0], want_codes[1])
    torch.testing.assert_close(want_scales[0], want_scales[1], equal_nan=True, rtol=0, atol=0)
    assert want_scales[1][:4].isnan().all()


@pytest.mark.parametrize("backend,isa", [("cpu", isa) for isa in cpu_isas()])
def test_8bit_map_with_irregular_thresholds_matches_the_reference(backend, isa):
    """A map whose thresholds follow no line needs more segments than the arithmetic 8-bit encoder has: the CPU
    searches the thresholds instead, and still agrees with the reference."""
    g = torch.Generator().manual_seed(5)
    irregular = torch.cat([torch.rand(255, generator=g) * 2 - 1, torch.ones(1)]).sort().values
    fmt = QuantFormat("8bit-irregular", 8, 256, tuple(irregular.tolist()))
    x = torch.cat([torch.randn(50_000, generator=g), code_boundaries(fmt)])
    fastopt.set_cpu_isa(isa)
    try:
        codes, scales = quantize(x, fmt, backend=backend)
    finally:
        fastopt.set_cpu_isa("auto")
    want_codes, want_scales = encode(x, fmt)
    assert torch.equal(scales, want_scales) and torch.equal(codes, want_codes)

@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FMT_IDS)
def test_round_trip_error_within_resolution(fmt):
    """|decode(encode(x)) − x| ≤ the map's resolution times the block's scale: half its widest gap (nearest
    rounding), or the distance from an end of x/scale's range ([-1, 1] or [0, 1]) to the nearest map entry."""
    x = blocks_with_spread(fmt, seed=3)
    codes, scales = encode(x, fmt)
    err = (decode(codes, scales, fmt, x.numel()) - x).abs().view(-1, fmt.block)
    table = fmt.table()
    low_end = -1.0 if fmt.qmap[0] < 0 else 0.0
    resolution = max(((table[1:] - table[:-1]).max() / 2).item(), table[0].item() - low_end, 1.0 - table[-1].item())
    bound = (resolution + 1e-6) * scales[:, None]  # + fp32 rounding of the decode itself
    assert (err <= bound).all()


@pytest.mark.parametrize("fmt", FORMATS.values(), ids=FMT_IDS)
def test_zeros_decode_to_zero(fmt):
    """Scale 0 means zero whatever the codes say (the unsigned 4-bit map has no 0): this is what a reset writes."""
    q = zeros(1000, fmt, "cpu")
    assert q.codes.numel() == fmt.code_bytes(1000) and q.scales.numel() == fmt.num_blocks(1000)
    assert torch.equal(q.dequantize(1000), torch.zeros(1000))
    codes, scales = encode(torch.zeros(300), fmt)
    assert torch.equal(scales, torch.zeros(fmt.num_blocks(300)))
    assert torch.equal(decode(codes, scales, fmt, 300), torch.zeros(300))


def test_bytes_per_parameter():
    assert SIGNED_4BIT.bytes_per_element() * 2 == pytest.approx(1.0625)
    assert FORMATS[(8, True)].bytes_per_element() * 2 == pytest.approx(2 + 8 / 256)
