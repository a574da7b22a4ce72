"""The arithmetic of each format on fresh random inputs, against float64 references."""

import pytest
import torch

from pipeline.quantize.formats import (
    FP8_MAX,
    dequantize_kv,
    fp8_linear,
    fp8_scale,
    pack_int4,
    quantize_fp8,
    quantize_kv,
    round_half_away,
    unpack_int4,
    weight_only_dequantize,
    weight_only_quantize,
)


def e4m3_values() -> torch.Tensor:
    """Every finite float8_e4m3fn value, decoded from its bits in float64."""
    values = []
    for bits in range(256):
        sign = -1.0 if bits & 0x80 else 1.0
        exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
        if exponent == 0xF and mantissa == 0x7:
            continue  # NaN
        if exponent == 0:
            values.append(sign * mantissa / 8 * 2.0 ** -6)
        else:
            values.append(sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return torch.tensor(sorted(set(values)), dtype=torch.float64)


def nearest_even_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float64 x to the nearest E4M3 value, ties to the even mantissa, saturating at +-448."""
    grid = e4m3_values()
    x = x.clamp(-FP8_MAX, FP8_MAX)
    idx = torch.searchsorted(grid, x).clamp(1, len(grid) - 1)
    lo, hi = grid[idx - 1], grid[idx]
    pick_hi = (hi - x) < (x - lo)
    tie = (hi - x) == (x - lo)
    # of two neighbours exactly one has an even (zero) last mantissa bit
    lo_bits = lo.to(torch.float32).to(torch.float8_e4m3fn).view(torch.uint8)
    lo_even = (lo_bits & 1) == 0
    return torch.where(tie, torch.where(lo_even, lo, hi), torch.where(pick_hi, hi, lo))


def test_e4m3_grid_is_complete():
    grid = e4m3_values()
    assert grid.max() == 448.0 and grid.min() == -448.0 and len(grid) == 253  # +-0 share one value


def test_fp8_scale_is_amax_over_448():
    amax = torch.rand(1, dtype=torch.float64).item() * 10
    assert fp8_scale(amax).item() == pytest.approx(amax / 448.0, rel=1e-7)
    assert fp8_scale(0.0).item() == pytest.approx(1 / 448.0)


def test_fp8_rounding_and_saturation_match_float64_reference():
    g = torch.Generator().manual_seed(11)
    x = torch.cat([torch.randn(20000, generator=g, dtype=torch.float64) * 100,
                   torch.tensor([500.0, -1000.0, 448.0, 464.0, 0.0, 1e-9])])
    scale = torch.tensor([1.0])
    got = quantize_fp8(x, scale).to(torch.float64)
    expected = nearest_even_e4m3(x.to(torch.float32).to(torch.float64))
    assert torch.equal(got, expected)
    assert got.abs().max() == 448.0  # saturated, never inf or NaN


def test_fp8_scaled_roundtrip_error_is_bounded():
    g = torch.Generator().manual_seed(12)
    w = torch.randn(64, 64, generator=g)
    s = fp8_scale(w.abs().max())
    back = quantize_fp8(w, s).float() * s
    # E4M3 has 3 mantissa bits: relative error at most 2^-4 for normal values
    normal = w.abs() > s * 2 ** -6
    assert ((back - w).abs()[normal] <= w.abs()[normal] * 2 ** -4 + 1e-12).all()


def test_fp8_linear_equals_float64_product_of_the_fp8_operands():
    g = torch.Generator().manual_seed(13)
    x, w, b = torch.randn(3, 5, 32, generator=g), torch.randn(16, 32, generator=g), torch.randn(16, generator=g)
    sa, sw = fp8_scale(x.abs().max()), fp8_scale(w.abs().max())
    wq = quantize_fp8(w, sw)
    y = fp8_linear(x, wq, sa, sw, b, torch.float32)
    xq64 = quantize_fp8(x, sa).to(torch.float64) * sa.double()
    ref = xq64 @ (wq.to(torch.float64) * sw.double()).t() + b.double()
    assert y.shape == (3, 5, 16)
    assert (y.double() - ref).abs().max() < 1e-4


def test_round_half_away_from_zero():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, -0.51])
    assert round_half_away(x).tolist() == [1.0, 2.0, 3.0, -1.0, -2.0, -3.0, 0.0, -1.0]


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_quantization_matches_float64_reference(bits):
    g = torch.Generator().manual_seed(14 + bits)
    w = torch.randn(48, 80, generator=g).to(torch.float16)
    w[3] = 0  # a zero row gets scale 0 and zeros
    q, scale = weight_only_quantize(w, bits, torch.float16)
    divisor, low, high = (128.0, -128, 127) if bits == 8 else (8.0, -8, 7)
    w64 = w.to(torch.float64)
    s64 = (w64.abs().amax(dim=1) / divisor).to(torch.float32).to(torch.float64)
    ratio = torch.where(s64[:, None] > 0, w64 / torch.where(s64 > 0, s64, 1)[:, None], torch.zeros_like(w64))
    expected = (torch.sign(ratio) * torch.floor(ratio.abs() + 0.5)).clamp(low, high)
    assert torch.equal(q.to(torch.float64), expected)
    assert torch.equal(scale, s64.to(torch.float16))
    assert q.min() >= low and q.max() <= high and (q[3] == 0).all()
    deq = weight_only_dequantize(q, scale, torch.float32)
    err = (deq - w.float()).abs()
    s = scale.float()[:, None]
    clipped = expected == high  # the row maximum maps to 128 (or 8) and is clipped to 127 (7): up to one step off
    rounding = s * (0.5 + abs(high) * 2 ** -10)  # half a step, plus the scale's own float16 rounding
    assert (err[~clipped] <= rounding.expand_as(err)[~clipped] + 1e-6).all()
    assert (err[clipped] <= (s * 1.1).expand_as(err)[clipped]).all()


def test_int4_pack_roundtrip_and_nibble_order():
    g = torch.Generator().manual_seed(15)
    q = torch.randint(-8, 8, (7, 10), generator=g, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (7, 5) and packed.dtype == torch.int8
    assert torch.equal(unpack_int4(packed), q)
    one = pack_int4(torch.tensor([[1, -2]], dtype=torch.int8)).view(torch.uint8)
    assert one.item() == 0x01 | (0x0E << 4)  # element 0 low nibble, element 1 (-2 = 0xE) high nibble
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_kv_cache_quantization(fmt):
    g = torch.Generator().manual_seed(16)
    k = torch.randn(2, 3, 5, 8, generator=g)
    limit = 448.0 if fmt == "fp8" else 127.0
    scale = torch.tensor([float(k.abs().max()) / limit])
    back = dequantize_kv(quantize_kv(k, scale, fmt), scale, torch.float32)
    tolerance = k.abs() * 2 ** -4 + scale * 2 ** -6 if fmt == "fp8" else scale * 0.5 + 1e-7
    assert ((back - k).abs() <= tolerance).all()
