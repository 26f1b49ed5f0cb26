"""1-bit packing (docs/design.md, phase 3): layout, padding, exact zeros, round trips, input checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from leo_dist.packing import pack_mask, pack_signs, packed_size, unpack_signs


def signs_with_zeros(n: int, gen: torch.Generator, zero_fraction: float = 0.2) -> torch.Tensor:
    """Random values with a share of exact zeros (both +0.0 and -0.0) mixed in."""
    x = torch.randn(n, generator=gen)
    u = torch.rand(n, generator=gen)
    x[u < zero_fraction / 2] = 0.0
    x[(u >= zero_fraction / 2) & (u < zero_fraction)] = -0.0
    return x


def numpy_reference(mask: torch.Tensor) -> np.ndarray:
    return np.packbits(mask.reshape(-1).numpy().astype(np.uint8), bitorder="little")


@pytest.mark.parametrize("n", range(71))
def test_every_small_length_round_trips_and_matches_numpy(n):
    gen = torch.Generator().manual_seed(n)
    x = signs_with_zeros(n, gen)

    bits = pack_signs(x)
    zeros = pack_mask(x == 0)
    assert bits.dtype == zeros.dtype == torch.uint8
    assert bits.shape == zeros.shape == (packed_size(n),) == ((n + 7) // 8,)
    # numpy pads its last byte with zero bits, so equality also pins the padding.
    np.testing.assert_array_equal(bits.numpy(), numpy_reference(x > 0))
    np.testing.assert_array_equal(zeros.numpy(), numpy_reference(x == 0))

    plain = unpack_signs(bits, n)
    assert torch.equal(plain, torch.where(x > 0, 1.0, -1.0))
    exact = unpack_signs(bits, n, zeros)
    assert torch.equal(exact, torch.sign(x))  # exact 0 where x == 0, including -0.0


@pytest.mark.parametrize("n", [1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 70])
def test_last_byte_is_zero_padded(n):
    bits = pack_mask(torch.ones(n, dtype=torch.bool))
    assert bits[: n // 8].eq(0xFF).all()
    if n % 8:
        assert bits[-1].item() == (1 << (n % 8)) - 1


def test_bit_order_is_least_significant_first():
    for i in range(16):
        mask = torch.zeros(16, dtype=torch.bool)
        mask[i] = True
        expected = [0, 0]
        expected[i // 8] = 1 << (i % 8)
        assert pack_mask(mask).tolist() == expected


def test_large_random_tensor_round_trips():
    gen = torch.Generator().manual_seed(123)
    n = 10_000_003  # not a multiple of 8, so the tail path runs too
    x = torch.randn(n, generator=gen)
    x[torch.randint(0, n, (1000,), generator=gen)] = 0.0
    bits = pack_signs(x)
    zeros = pack_mask(x == 0)
    np.testing.assert_array_equal(bits.numpy(), numpy_reference(x > 0))
    np.testing.assert_array_equal(zeros.numpy(), numpy_reference(x == 0))
    assert torch.equal(unpack_signs(bits, n, zeros), torch.sign(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_unpack_dtype(dtype):
    x = torch.tensor([0.5, -2.0, 0.0, 3.0, -0.0, -1.0, 7.0, 0.25, -4.0, 0.0])
    out = unpack_signs(pack_signs(x), x.numel(), pack_mask(x == 0), dtype=dtype)
    assert out.dtype == dtype
    assert torch.equal(out, torch.sign(x).to(dtype))


def test_pack_accepts_any_shape_and_dtype_read_flat():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 7, generator=gen)
    assert torch.equal(pack_signs(x), pack_signs(x.reshape(-1)))
    assert torch.equal(pack_signs(x.to(torch.bfloat16)), pack_signs(x))
    assert torch.equal(pack_signs(x.to(torch.float64)), pack_signs(x))


@pytest.mark.parametrize(
    "view",
    [
        pytest.param(lambda t: t.reshape(8, 9).t(), id="transposed"),
        pytest.param(lambda t: t[::3], id="strided"),
        pytest.param(lambda t: t[3:], id="offset"),  # contiguous, storage offset not a multiple of 8
        pytest.param(lambda t: t[5:69].reshape(8, 8)[:, 1:6], id="offset-and-strided"),
    ],
)
def test_non_contiguous_and_offset_inputs(view):
    gen = torch.Generator().manual_seed(9)
    base = signs_with_zeros(72, gen)
    x = view(base)
    dense = x.contiguous()
    assert torch.equal(pack_signs(x), pack_signs(dense))
    # A mask that is itself a view of a larger mask (e.g. a slice of a bucket's mask).
    assert torch.equal(pack_mask(view(base > 0)), pack_mask(dense > 0))
    np.testing.assert_array_equal(pack_mask(view(base == 0)).numpy(), numpy_reference(dense == 0))


def test_unpack_reads_non_contiguous_bits():
    gen = torch.Generator().manual_seed(2)
    x = signs_with_zeros(40, gen)
    bits, zeros = pack_signs(x), pack_mask(x == 0)
    spread_bits = torch.zeros(2 * bits.numel(), dtype=torch.uint8)
    spread_zeros = torch.zeros(2 * zeros.numel(), dtype=torch.uint8)
    spread_bits[::2] = bits
    spread_zeros[1::2] = zeros
    out = unpack_signs(spread_bits[::2], 40, spread_zeros[1::2])
    assert torch.equal(out, torch.sign(x))


def test_unpack_ignores_extra_bytes_and_bits_past_n():
    bits = torch.tensor([0xFF, 0xFF, 0xAB], dtype=torch.uint8)
    out = unpack_signs(bits, 5)
    assert torch.equal(out, torch.ones(5))
    assert unpack_signs(torch.empty(0, dtype=torch.uint8), 0).numel() == 0


def test_pack_into_out_buffer():
    x = torch.tensor([1.0, -1.0, 2.0, 0.0, 3.0, -3.0, 4.0, 5.0, 6.0, -7.0])
    out = torch.full((2,), 0xEE, dtype=torch.uint8)
    result = pack_signs(x, out=out)
    assert result is out
    np.testing.assert_array_equal(out.numpy(), numpy_reference(x > 0))


@pytest.mark.parametrize(
    "out",
    [
        torch.empty(3, dtype=torch.uint8),            # wrong size
        torch.empty(2, dtype=torch.int32),            # wrong dtype
        torch.empty(4, dtype=torch.uint8)[::2],       # not contiguous
    ],
)
def test_bad_out_buffer_is_rejected(out):
    with pytest.raises(ValueError, match="out"):
        pack_mask(torch.ones(10, dtype=torch.bool), out=out)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.int64])
def test_pack_mask_requires_bool(dtype):
    with pytest.raises(TypeError, match="mask"):
        pack_mask(torch.ones(8, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float32, torch.int32])
def test_unpack_requires_uint8(dtype):
    with pytest.raises(TypeError, match="bits"):
        unpack_signs(torch.zeros(2, dtype=dtype), 10)
    with pytest.raises(TypeError, match="zeros"):
        unpack_signs(torch.zeros(2, dtype=torch.uint8), 10, torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize("nbytes,n", [(0, 1), (1, 9), (2, 17), (8, 65)])
def test_too_few_bytes(nbytes, n):
    with pytest.raises(ValueError, match="bytes"):
        unpack_signs(torch.zeros(nbytes, dtype=torch.uint8), n)
    with pytest.raises(ValueError, match="zeros"):
        unpack_signs(torch.zeros(packed_size(n), dtype=torch.uint8), n, torch.zeros(nbytes, dtype=torch.uint8))


def test_negative_sizes_are_rejected():
    with pytest.raises(ValueError):
        unpack_signs(torch.zeros(1, dtype=torch.uint8), -1)
    with pytest.raises(ValueError, match="n"):
        packed_size(-1)
