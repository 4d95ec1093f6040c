import pytest
import torch

from llmq.kernels.layout import (group_index, group_width, pack_cols, pack_rows, unpack_cols, unpack_qweight,
                                 unpack_qzeros, unpack_rows)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(8, 1), (16, 24), (64, 40), (96, 8), (256, 72)])
def test_round_trip(bits, shape):
    per = 32 // bits
    k, n = shape[0] * per, shape[1] * per
    g = torch.Generator().manual_seed(k * 1000 + n + bits)
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (k // per, n)
    assert torch.equal(unpack_rows(packed, bits), codes.int())
    zeros = torch.randint(0, 2**bits, (n, k), generator=g)  # [G, N] with N = k
    packed_z = pack_cols(zeros, bits)
    assert packed_z.shape == (n, k // per)
    assert torch.equal(unpack_cols(packed_z, bits), zeros.int())


@pytest.mark.parametrize("bits", [4, 8])
def test_layout_is_lsb_first_along_k(bits):
    # Build the expected words with plain Python integers, independently of torch shifts.
    per = 32 // bits
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 2**bits, (2 * per, 3), generator=g)
    packed = pack_rows(codes, bits)
    for row in range(2):
        for col in range(3):
            word = 0
            for j in range(per):
                word |= int(codes[row * per + j, col]) << (bits * j)
            signed = word - 2**32 if word >= 2**31 else word
            assert int(packed[row, col]) == signed


def test_layout_of_zeros_is_along_n():
    zeros = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]])
    assert int(pack_cols(zeros, 4)[0, 0]) == 0xF7654321 - 2**32


def test_high_bit_codes_survive():
    codes = torch.full((8, 4), 15)
    assert torch.equal(unpack_rows(pack_rows(codes, 4), 4), codes.int())


def test_rows_must_fill_words():
    with pytest.raises(ValueError):
        pack_rows(torch.zeros(6, 2, dtype=torch.int64), 4)


def test_checkpoint_unpackers_give_uint8_codes():
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 16, (64, 24), generator=g)
    zeros = torch.randint(0, 16, (2, 24), generator=g)
    q, z = unpack_qweight(pack_rows(codes, 4), 4), unpack_qzeros(pack_cols(zeros, 4), 4)
    assert q.dtype == z.dtype == torch.uint8
    assert torch.equal(q.long(), codes) and torch.equal(z.long(), zeros)


def test_group_index_and_the_minus_one_rule():
    assert group_width(-1, 96) == 96 and group_width(32, 96) == 32
    assert group_index(96, 32).tolist() == [k // 32 for k in range(96)]
    assert group_index(96, -1).tolist() == [0] * 96
    g_idx = torch.randperm(96, generator=torch.Generator().manual_seed(3)).int() // 32
    got = group_index(96, 32, g_idx)
    assert got.dtype == torch.long and torch.equal(got, g_idx.long())


def test_byte_formatter():
    from llmq.units import human_bytes

    assert [human_bytes(n) for n in (None, 0, 1023, 1024, 1536, 5 * 2**30)] == [
        "-", "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 GiB"]
