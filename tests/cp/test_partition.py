"""Page shares, sender policies and token splits: worked examples and brute force."""

import time

import numpy as np
import pytest
import torch

from cpkv.cp import (
    SenderPolicy,
    SplitPlan,
    chunk_share,
    interleave_split,
    page_share,
    pages_sent_by,
    zigzag_split,
)


def test_worked_examples():
    assert [page_share(10, 4, r) for r in range(4)] == [range(0, 3), range(3, 6), range(6, 8),
                                                        range(8, 10)]
    assert [list(chunk_share(10, 4, r, 0, 4)) for r in range(4)] == [[0, 1, 2], [3], [], []]
    z = zigzag_split(10, 2)
    assert [p.tolist() for p in z.positions] == [[0, 1, 2, 8, 9], [3, 4, 5, 6, 7]]
    assert zigzag_split(16, 4).block_restore() == [0, 2, 4, 6, 7, 5, 3, 1]
    assert [p.tolist() for p in interleave_split(5, 2).positions] == [[0, 2, 4], [1, 3]]


@pytest.mark.parametrize("cp", range(1, 7))
def test_page_share_brute_force(cp):
    for n in range(0, 40):
        shares = [page_share(n, cp, r) for r in range(cp)]
        assert [p for s in shares for p in s] == list(range(n))  # disjoint, ordered, complete
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        for s0 in range(n + 1):
            for s1 in range(s0, n + 1):
                for r in range(cp):
                    got = chunk_share(n, cp, r, s0, s1)
                    assert list(got) == [p for p in shares[r] if s0 <= p < s1]


@pytest.mark.parametrize("cp", range(1, 5))
def test_sender_policies(cp):
    for n in (0, 1, 7):
        for req in range(5):
            for policy, owner in ((SenderPolicy.RANK0, 0), ("rotate", req % cp)):
                got = [list(pages_sent_by(policy, n, cp, r, req)) for r in range(cp)]
                assert got == [list(range(n)) if r == owner else [] for r in range(cp)]
            got = [pages_sent_by("all", n, cp, r, req) for r in range(cp)]
            assert got == [page_share(n, cp, r) for r in range(cp)]


def _zigzag_brute(n, cp):
    """Rank of each token by the definition: 2cp blocks, first n % 2cp one longer."""
    sizes = [n // (2 * cp) + (b < n % (2 * cp)) for b in range(2 * cp)]
    block_of = [b for b, s in enumerate(sizes) for _ in range(s)]
    return [[t for t in range(n) if block_of[t] in (r, 2 * cp - 1 - r)] for r in range(cp)]


def _check_plan(plan, lens, owners_per_seq):
    cp = plan.cp_size
    offset, want = 0, [[] for _ in range(cp)]
    for n, owners in zip(lens, owners_per_seq, strict=True):
        for r in range(cp):
            want[r] += [offset + t for t in owners[r]]
        offset += n
    assert [p.tolist() for p in plan.positions] == want
    assert plan.padded_len == max(len(w) for w in want)
    assert plan.local_lens == [len(w) for w in want]
    # gather_index restores sequence order from the padded gather, padding never referenced
    gathered = torch.full((cp * plan.padded_len,), -1, dtype=torch.int64)
    for r, pos in enumerate(plan.positions):
        gathered[r * plan.padded_len: r * plan.padded_len + len(pos)] = pos
    assert gathered[plan.gather_index].tolist() == list(range(sum(lens)))


@pytest.mark.parametrize("cp", range(1, 5))
def test_zigzag_brute_force(cp):
    for n in range(2 * cp, 2 * cp + 30):
        _check_plan(zigzag_split(n, cp), [n], [_zigzag_brute(n, cp)])


@pytest.mark.parametrize("cp", range(1, 5))
def test_interleave_brute_force(cp):
    for n in range(cp, cp + 30):
        _check_plan(interleave_split(n, cp), [n], [[list(range(r, n, cp)) for r in range(cp)]])


def test_sequence_order_splits_each_sequence_on_its_own():
    lens = [9, 4, 13]
    _check_plan(zigzag_split(lens, 2, order="sequence"), lens,
                [_zigzag_brute(n, 2) for n in lens])
    _check_plan(interleave_split(lens, 3, order="sequence"), lens,
                [[list(range(r, n, 3)) for r in range(3)] for n in lens])


def _check_positions(plan, want):
    assert [p.tolist() for p in plan.positions] == want
    assert plan.padded_len == max(len(w) for w in want)
    gathered = torch.full((plan.cp_size * plan.padded_len,), -1, dtype=torch.int64)
    for r, pos in enumerate(want):
        gathered[r * plan.padded_len: r * plan.padded_len + len(pos)] = torch.tensor(pos)
    assert gathered[plan.gather_index].tolist() == list(range(plan.total_len))


def _sglang_zigzag(lens, cp):
    """Rank r's rows in SGLang's batch order: block r of every sequence, then block 2cp-1-r of
    every sequence (written from the definition, block by block)."""
    offsets = [sum(lens[:s]) for s in range(len(lens))]
    seqs = list(zip(offsets, lens, strict=True))
    return [[o + t for o, n in seqs for t in _block(n, cp, r)]
            + [o + t for o, n in seqs for t in _block(n, cp, 2 * cp - 1 - r)] for r in range(cp)]


def _block(n, cp, b):
    sizes = [n // (2 * cp) + (i < n % (2 * cp)) for i in range(2 * cp)]
    start = sum(sizes[:b])
    return list(range(start, start + sizes[b]))


def test_sglang_batch_orders_worked_examples():
    assert zigzag_split([8, 8], 2).positions[0].tolist() == [0, 1, 8, 9, 6, 7, 14, 15]
    assert [p.tolist() for p in interleave_split([1, 5], 2).positions] == [[0, 2, 4], [1, 3, 5]]
    assert [p.tolist() for p in interleave_split([2], 3).positions] == [[0], [1], []]


@pytest.mark.parametrize("lens", [[8, 8], [9, 4, 13], [17, 8, 40], [5, 11, 4]],
                         ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("cp", [1, 2, 3])
def test_sglang_batch_orders(lens, cp):
    if min(lens) >= 2 * cp:
        _check_positions(zigzag_split(lens, cp), _sglang_zigzag(lens, cp))
    total = sum(lens)
    _check_positions(interleave_split(lens, cp),
                     [list(range(r, total, cp)) for r in range(cp)])


def test_from_positions_describes_any_split():
    plan = SplitPlan.from_positions([np.array([4, 0]), [2], torch.tensor([1, 3])], [3, 2])
    assert plan.kind == "custom" and plan.cp_size == 3 and plan.padded_len == 2
    _check_positions(plan, [[4, 0], [2], [1, 3]])
    z = zigzag_split([9, 12], 2)
    again = SplitPlan.from_positions(z.positions, z.seq_lens)
    assert torch.equal(again.gather_index, z.gather_index)


@pytest.mark.parametrize("positions,message", [
    ([[0, 1], [1, 2]], "expected a permutation of the batch's 4 tokens, got 4 positions "
                       "(missing [3], out of range or repeated [1])"),
    ([[0, 1], [2]], "got 3 positions (missing [3]"),
    ([[0, 1], [2, 4]], "out of range or repeated [4]"),
    ([[0, -1], [2, 3]], "out of range or repeated [-1]"),
    ([[0.0, 1.0], [2, 3]], "per_rank_positions[0]: expected a 1-D sequence of ints"),
    ([[[0, 1]], [2, 3]], "per_rank_positions[0]: expected a 1-D sequence of ints"),
    ([], "cp_size: expected a positive int, got 0"),
])
def test_from_positions_refuses(positions, message):
    with pytest.raises(ValueError) as info:
        SplitPlan.from_positions(positions, [4])
    assert message in str(info.value)


def test_huge_cp_fails_fast():
    t0 = time.monotonic()
    for call in (lambda: zigzag_split(3_000_000, 10**6), lambda: interleave_split(5, 10**6),
                 lambda: page_share(5, 10**6, 0)):
        with pytest.raises(ValueError, match="cp_size: expected at most 65536 ranks"):
            call()
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("call,message", [
    (lambda: zigzag_split(7, 4), "a sequence of 7 tokens is too short for cp_size 4 (needs >= 8"),
    (lambda: zigzag_split([20, 3], 2), "a sequence of 3 tokens is too short"),
    (lambda: interleave_split(2, 3, order="sequence"),
     "a sequence of 2 tokens is too short for cp_size 3"),
    (lambda: zigzag_split(8, 2, order="seq"), "order: expected 'batch' (SGLang's) or"),
    (lambda: zigzag_split([], 2), "expected at least one sequence"),
    (lambda: zigzag_split(0, 1), "expected positive ints, got 0"),
    (lambda: page_share(10, 0, 0), "cp_size: expected a positive int, got 0"),
    (lambda: page_share(10, 2, 2), "cp_rank: expected an int in [0, 2), got 2"),
    (lambda: page_share(-1, 2, 0), "num_pages: expected a non-negative int, got -1"),
    (lambda: chunk_share(10, 2, 0, 4, 11), "expected 0 <= start <= stop <= 10, got [4, 11)"),
    (lambda: chunk_share(10, 2, 0, 5, 4), "got [5, 4)"),
    (lambda: pages_sent_by("some", 4, 2, 0), "'some' is not a valid SenderPolicy"),
    (lambda: interleave_split(8, 2).block_restore(), "defined for a zigzag plan of one sequence"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
