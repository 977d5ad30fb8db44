"""The transposing exchange's index arithmetic (riemann_zero.sharding.exchange), in one process.

A world of W ranks is simulated with W threads and an in-memory ``all_to_all_single`` (same
argument convention as the counting one): every rank builds its own plans from the fragment
table only, and the test checks that (1) the row blocks each rank receives equal the rows of the
dense Aᵀ = lora_Aᵀ, [0 | gK]ᵀ and lora_B it owns, (2) the reverse exchange writes new row blocks
back into exactly the flat fragments of the new dense factors, and (3) each rank's send buffers
have the sizes ``exchange_counts`` predicts from its own fragments alone (the byte model).
Over many (r, n, m, W) and fragment cuts: ZeRO-1/2 cuts anywhere (random, empty fragments
included, in rank order or not), ZeRO-3 ceil-chunks, FSDP2 Shard(0) row blocks, n < W.
Everything is exact (integer positions, copies of float64 values): equality, no tolerance.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from riemann_zero.sharding.exchange import (
    PieceExchange,
    check_tiling,
    column_bounds,
    exchange_counts,
    owned_rows,
)


class FakeWorld:
    """``all_to_all_single`` among W threads: rank p's call returns what the others sent it."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.boxes: list[list[torch.Tensor]] = [[] for _ in range(world)]
        self.sent = [0] * world  # elements each rank handed to the collective, summed

    def all_to_all(self, rank: int):
        def call(send: torch.Tensor, recv_splits: list[int], send_splits: list[int]):
            self.sent[rank] += send.numel()
            self.boxes[rank] = list(send.split(send_splits))
            self.barrier.wait()
            recv = [self.boxes[p][rank] for p in range(self.world)]
            assert [t.numel() for t in recv] == recv_splits
            self.barrier.wait()
            return torch.cat(recv)
        return call


def run_ranks(fake: FakeWorld, fn) -> None:
    """``fn(rank)`` on every simulated rank at once; the first failure is re-raised."""
    errors = []

    def target(p: int) -> None:
        try:
            fn(p)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            fake.barrier.abort()  # release the other ranks

    world = fake.world
    threads = [threading.Thread(target=target, args=(p,)) for p in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)),
                   errors[0])


def cuts_anywhere(numel: int, world: int, rng: random.Random, shuffle: bool) -> torch.Tensor:
    """(world, 2) fragments from world − 1 random cut points (repeats: empty fragments)."""
    cuts = sorted(rng.randint(0, numel) for _ in range(world - 1))
    bounds = [0, *cuts, numel]
    frags = [(bounds[p], bounds[p + 1] - bounds[p]) for p in range(world)]
    if shuffle:  # a rank need not hold the part right after its predecessor's
        rng.shuffle(frags)
    return torch.tensor(frags, dtype=torch.int64)


def chunks(numel: int, world: int) -> torch.Tensor:
    """ZeRO-3: ceil(numel / world) elements per rank, the tail short or empty."""
    size = -(-numel // world)
    return torch.tensor([(min(p * size, numel), max(0, min((p + 1) * size, numel) - p * size))
                         for p in range(world)], dtype=torch.int64)


def row_blocks(rows: int, cols: int, world: int) -> torch.Tensor:
    """FSDP2 Shard(0): torch.chunk of the rows."""
    size = -(-rows // world)
    return torch.tensor([(min(p * size, rows) * cols,
                          max(0, min((p + 1) * size, rows) - min(p * size, rows)) * cols)
                         for p in range(world)], dtype=torch.int64)


def check(r: int, m: int, n: int, world: int, frags_a: torch.Tensor,
          frags_b: torch.Tensor | None, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a, ga = torch.randn(2 * r, n, generator=gen, dtype=torch.float64), torch.randn(
        2 * r, n, generator=gen, dtype=torch.float64)
    b, gb = torch.randn(m, 2 * r, generator=gen, dtype=torch.float64), torch.randn(
        m, 2 * r, generator=gen, dtype=torch.float64)
    a_new, b_new = torch.randn_like(a), torch.randn_like(b)
    fake = FakeWorld(world)
    bounds = column_bounds(n, world)

    def piece(t: torch.Tensor, frag) -> torch.Tensor:
        s, k = frag.tolist()
        return t.reshape(-1)[s: s + k]

    def rank_fn(p: int):
        ex = PieceExchange(r, m, n, frags_a, frags_b, p)
        call = fake.all_to_all(p)
        bs = None if frags_b is None else (piece(b, frags_b[p]), piece(gb, frags_b[p]))
        rb, rgb, at, gat = ex.read(piece(a, frags_a[p]), piece(ga, frags_a[p]),
                                   *(bs or (None, None)), call)
        sent_fwd = fake.sent[p]
        lo, hi = bounds[p], bounds[p + 1]
        assert torch.equal(at, a.mT[lo:hi])
        assert torch.equal(gat[:, r:], ga.mT[lo:hi, r:])
        assert not gat[:, :r].any()  # the V block's gradient is never sent
        if frags_b is not None:
            first, end, _ = owned_rows(*frags_b[p].tolist(), 2 * r)
            assert torch.equal(rb, b[first:end]) and torch.equal(rgb, gb[first:end])
            new_b = b_new[first:end]
        else:
            new_b = None
        fa, fb = ex.write(new_b, a_new.mT[lo:hi], call)
        assert torch.equal(fa, piece(a_new, frags_a[p]))
        if frags_b is not None:
            assert torch.equal(fb, piece(b_new, frags_b[p]))
        fb_own = None if frags_b is None else tuple(frags_b[p].tolist())
        assert (sent_fwd, fake.sent[p] - sent_fwd) == exchange_counts(
            r, n, tuple(frags_a[p].tolist()), fb_own, p, world)

    run_ranks(fake, rank_fn)


SHAPES = [(1, 3, 5), (2, 4, 7), (2, 6, 16), (3, 5, 4), (4, 9, 24), (1, 2, 1)]  # (r, m, n)


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("r,m,n", SHAPES)
def test_zero12_cuts_anywhere(r, m, n, world):
    """ZeRO-1/2 cut the flat group anywhere: random cuts of both factors, empty fragments,
    fragments not in rank order; 4 draws per case."""
    rng = random.Random(hash((r, m, n, world)) % 1000)
    for draw in range(4):
        fa = cuts_anywhere(2 * r * n, world, rng, shuffle=draw % 2 == 1)
        fb = cuts_anywhere(2 * r * m, world, rng, shuffle=draw % 2 == 1)
        check(r, m, n, world, fa, fb, seed=draw)


@pytest.mark.parametrize("world", [2, 3, 4, 7, 16])
@pytest.mark.parametrize("r,m,n", SHAPES)
def test_zero3_chunks(r, m, n, world):
    """ZeRO-3 ceil-chunks (rows cut mid-row; the tail ranks empty when numel < world)."""
    check(r, m, n, world, chunks(2 * r * n, world), chunks(2 * r * m, world), seed=world)


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("r,m,n", SHAPES)
def test_fsdp2_shard0_rows(r, m, n, world):
    """FSDP2 lora_A on Shard(0): whole rows of lora_A per rank (empty past 2r rows), lora_B not
    exchanged."""
    check(r, m, n, world, row_blocks(2 * r, n, world), None, seed=world)


def test_more_ranks_than_columns_and_elements():
    """Regression: n < world (ranks without a column block) and fragments of one element or
    none; the bytes per rank still come from the rank's own fragments."""
    r, m, n, world = 1, 2, 3, 8
    check(r, m, n, world, chunks(2 * r * n, world), chunks(2 * r * m, world), seed=0)
    assert column_bounds(n, world).count(0) > 1  # rank 0 and others own no column


def test_bytes_per_rank_fall_with_the_world():
    """Llama-3-8B's q_proj at r = 16, ZeRO-3: the most any rank sends each way shrinks ~1/world
    (never a whole factor, nothing m·n)."""
    r, m, n = 16, 4096, 4096
    worst = {}
    for world in (8, 64, 1024):
        worst[world] = max(sum(exchange_counts(r, n, tuple(chunks(2 * r * n, world)[p].tolist()),
                                               tuple(chunks(2 * r * m, world)[p].tolist()), p,
                                               world))
                           for p in range(world))
        # values + K gradients ≤ 2·(2rn/W), Aᵀ block back 2r·n/W, plus < 4·2r boundary elements
        assert worst[world] <= 6 * r * n // world + 2 * (2 * r) + 8 * r
    assert worst[64] * 6 < worst[8] and worst[1024] * 12 < worst[64]


def test_fragments_must_tile_the_parameter():
    """A fragment table with a hole or an overlap is refused with the fix in the message."""
    with pytest.raises(ValueError, match="do not tile"):
        check_tiling(torch.tensor([[0, 3], [4, 2]]), 6, "lora_A")
    with pytest.raises(ValueError, match="do not tile"):
        check_tiling(torch.tensor([[0, 4], [3, 3]]), 6, "lora_A")
    check_tiling(torch.tensor([[3, 3], [0, 3], [6, 0]]), 6, "lora_A")
