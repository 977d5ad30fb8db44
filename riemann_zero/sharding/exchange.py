"""The transposing exchange: flat pieces of an adapter's factors ↔ the row blocks it steps.

Under ZeRO-1/2/3 (and FSDP2 with lora_A on ``Shard(0)``) each rank holds the elements
``[start, start + numel)`` of the row-major flattened lora_A (2r × n) and lora_B (m × 2r), cut
anywhere. The manifold step wants row blocks of B and of Aᵀ (every sum over rows is then a small
all-reduced Gram). Two moves give it them, both in ONE ``all_to_all_single`` per adapter:

- **n side (columns of lora_A).** Rank j owns columns [c_j, c_{j+1}) of lora_A, i.e. rows of
  Aᵀ = [V | K], with c_j = ⌊j·n/world⌋ (:func:`column_bounds`; none when n < world and j draws an
  empty block). Every rank sends each owner the values of its piece in that owner's columns,
  and the gradients of those in the K block (rows r … 2r−1 of lora_A; the V block's gradient is
  used by no algorithm and stays zero): about 3·r·n/world numbers per rank.
- **m side (rows of lora_B cut between ranks).** A row belongs to the rank holding its first
  element; a rank whose piece starts mid-row sends that leading part (values and gradients,
  fewer than 2·2r numbers) to the row's owner.

After the step one reverse ``all_to_all_single`` returns the new values to the piece holders.
Which element goes where depends only on every rank's (start, numel), known once at setup, so the
index plans (:class:`Plan`) are built once per adapter and cached; a step runs one
``index_select``, the all-to-all and one ``index_copy_`` each way. Nothing m × n, nor a whole
factor, is ever sent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PieceExchange", "Route", "Plan", "column_bounds", "chunk", "owned_rows", "holders",
           "check_tiling", "lora_a_routes", "boundary_route", "exchange_counts"]

AllToAll = Callable[[Tensor, list[int], list[int]], Tensor]


def column_bounds(n: int, world: int) -> list[int]:
    """c_0 … c_world: rank j owns columns [c_j, c_{j+1}) of lora_A (rows of Aᵀ), c_j = ⌊j·n/world⌋:
    block sizes differ by at most one, and a rank owns none only when n < world."""
    return [j * n // world for j in range(world + 1)]


def chunk(numel: int, world: int, rank: int, unit: int = 1) -> tuple[int, int]:
    """(start, numel) of ``rank``'s ceil-sized piece of ``numel`` elements cut in units of
    ``unit`` (ZeRO-3: unit 1; FSDP2 ``Shard(0)`` of a (rows × unit) matrix: unit = row length)."""
    units = numel // unit
    size = -(-units // world)
    lo, hi = min(rank * size, units), min((rank + 1) * size, units)
    return lo * unit, (hi - lo) * unit


def owned_rows(start: int, numel: int, cols: int) -> tuple[int, int, int]:
    """(first, end, head) of the piece [start, start + numel) of a row-major (·, cols) matrix:
    rows [first, end) start inside the piece and are owned here (the last one may continue on
    later ranks); the leading ``head`` elements belong to row first − 1, owned by an earlier
    rank."""
    if numel == 0:
        return 0, 0, 0
    first = -(-start // cols)
    end = -(-(start + numel) // cols)
    head = min(first * cols - start, numel)
    return first, max(first, end), head


def check_tiling(pieces: Tensor, numel: int, what: str) -> None:
    """Raise unless the non-empty (start, numel) rows of ``pieces`` tile [0, numel) exactly."""
    keep = pieces[pieces[:, 1] > 0]
    keep = keep[torch.argsort(keep[:, 0])]
    ends = torch.cat([keep.new_zeros(1), (keep[:, 0] + keep[:, 1])])
    if not (bool((keep[:, 0] == ends[:-1]).all()) and int(ends[-1]) == numel):
        raise ValueError(f"{what}: the ranks' flat pieces {keep.tolist()} do not tile its "
                         f"{numel} elements; the engine must partition every adapter parameter "
                         "exactly once (one data-parallel group, no replicated copies)")


def holders(pieces: Tensor, idx: Tensor) -> Tensor:
    """The rank whose piece holds each flat index in ``idx`` (``pieces``: (world, 2) start,
    numel, tiling the parameter; see :func:`check_tiling`)."""
    ranks = torch.nonzero(pieces[:, 1] > 0).flatten()
    starts, order = torch.sort(pieces[ranks, 0])
    return ranks[order][torch.searchsorted(starts, idx, right=True) - 1]


@dataclass
class Route:
    """Where one buffer's elements go: this rank sends ``src[send_idx[k]]`` to rank ``send_to[k]``
    and puts the k-th element it receives at ``dst[recv_pos[k]]``, that element coming from rank
    ``recv_from[k]``. Both sides are grouped by rank (non-decreasing ``send_to``/``recv_from``) and,
    between two ranks, in the same order, so sender and receiver agree without talking."""

    send_idx: Tensor
    send_to: Tensor
    recv_pos: Tensor
    recv_from: Tensor

    def reversed(self) -> Route:
        """The way back: received positions are sent to where they came from."""
        return Route(self.recv_pos, self.recv_from, self.send_idx, self.send_to)


class Plan:
    """Routes over consecutive source / target buffers merged into ONE all-to-all.

    Per destination rank, route 0's elements come first, then route 1's, and so on (a stable
    sort by rank keeps each route's own order). Index tensors live on ``device``.
    """

    def __init__(self, routes: list[Route], src_sizes: list[int], dst_sizes: list[int],
                 world: int, device: torch.device | str = "cpu") -> None:
        def merged(idx: list[Tensor], sizes: list[int], ranks: list[Tensor]
                   ) -> tuple[Tensor, list[int]]:
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            flat = torch.cat([i + o for i, o in zip(idx, offsets)])
            rank = torch.cat(ranks)
            order = torch.argsort(rank, stable=True)
            return flat[order].to(device), torch.bincount(rank, minlength=world).tolist()

        self.send_idx, self.send_splits = merged([rt.send_idx for rt in routes], src_sizes,
                                                 [rt.send_to for rt in routes])
        self.recv_pos, self.recv_splits = merged([rt.recv_pos for rt in routes], dst_sizes,
                                                 [rt.recv_from for rt in routes])
        self.dst_sizes = list(dst_sizes)

    def run(self, srcs: list[Tensor], all_to_all: AllToAll) -> list[Tensor]:
        """Send from the concatenated ``srcs``; return the target buffers (zeros where nothing
        arrived)."""
        src = srcs[0] if len(srcs) == 1 else torch.cat(srcs)
        recv = all_to_all(src.index_select(0, self.send_idx), self.recv_splits, self.send_splits)
        out = recv.new_zeros(sum(self.dst_sizes))
        out.index_copy_(0, self.recv_pos, recv)
        return list(out.split(self.dst_sizes))


def lora_a_routes(r: int, n: int, pieces: Tensor, rank: int) -> tuple[Route, Route]:
    """(values, K-block gradients): this rank's piece of lora_A (2r × n, row-major) → the
    column owners, landing in each owner's row block of Aᵀ (n_j × 2r, row-major).

    Args:
        pieces: (world, 2) int64 (start, numel) of every rank's piece of lora_A.
        rank: this rank's index in ``pieces``.
    """
    world = pieces.shape[0]
    bounds = torch.tensor(column_bounds(n, world))
    # Sender: my elements, grouped by the owner of their column (flat order inside a group).
    start, numel = pieces[rank].tolist()
    e = torch.arange(start, start + numel)
    owner = torch.searchsorted(bounds, e % n, right=True) - 1
    order = torch.argsort(owner, stable=True)
    owner, k_send = owner[order], e[order] >= r * n
    # Receiver: my column block of every row, in flat order, grouped by the rank holding it.
    lo, hi = bounds[rank].item(), bounds[rank + 1].item()
    rows = torch.arange(2 * r).unsqueeze(1)
    cols = torch.arange(lo, hi).unsqueeze(0)
    mine = (rows * n + cols).reshape(-1)
    pos = ((cols - lo) * 2 * r + rows).reshape(-1)  # (col − lo, row) of Aᵀ's block
    held = holders(pieces, mine) if mine.numel() else mine
    by = torch.argsort(held, stable=True)
    held, pos, k_recv = held[by], pos[by], mine[by] >= r * n
    values = Route(order, owner, pos, held)
    grads = Route(order[k_send], owner[k_send], pos[k_recv], held[k_recv])
    return values, grads


def boundary_route(r: int, pieces: Tensor, rank: int) -> Route:
    """The leading partial row of each rank's piece of lora_B (m × 2r) → the row's owner,
    landing in the owner's last row (positions in its owned rows, row-major).

    Args:
        pieces: (world, 2) int64 (start, numel) of every rank's piece of lora_B.
        rank: this rank's index in ``pieces``.
    """
    c = 2 * r
    rows = [owned_rows(s, k, c) for s, k in pieces.tolist()]
    senders = [p for p, (_, _, head) in enumerate(rows) if head > 0]
    row_start = torch.tensor([pieces[p, 0].item() // c * c for p in senders], dtype=torch.int64)
    owner = holders(pieces, row_start).tolist() if senders else []
    empty = torch.zeros(0, dtype=torch.int64)
    send_idx, send_to, recv_pos, recv_from = empty, empty, [empty], [empty]
    for p, o in zip(senders, owner):
        head = rows[p][2]
        if p == rank:
            send_idx, send_to = torch.arange(head), torch.full((head,), o)
        if o == rank:
            start = int(pieces[p, 0])
            at = (start // c - rows[rank][0]) * c + start % c
            recv_pos.append(torch.arange(at, at + head))
            recv_from.append(torch.full((head,), p))
    return Route(send_idx, send_to, torch.cat(recv_pos), torch.cat(recv_from))


class PieceExchange:
    """One adapter's exchange between this rank's flat pieces and its row blocks.

    Args:
        r, m, n: the adapter's rank and shape (lora_B m × 2r, lora_A 2r × n).
        pieces_a: (world, 2) int64 (start, numel) of every rank's piece of lora_A.
        pieces_b: the same for lora_B, or None where lora_B rows are never cut (FSDP2).
        rank: this rank's index in the group.
        device: where the index plans live (the pieces' device).
    """

    def __init__(self, r: int, m: int, n: int, pieces_a: Tensor, pieces_b: Tensor | None,
                 rank: int, device: torch.device | str = "cpu") -> None:
        world = pieces_a.shape[0]
        check_tiling(pieces_a, 2 * r * n, "lora_A")
        bounds = column_bounds(n, world)
        self.c, self.n_rows = 2 * r, bounds[rank + 1] - bounds[rank]
        self.len_a = int(pieces_a[rank, 1])
        values, grads = lora_a_routes(r, n, pieces_a, rank)
        block = self.n_rows * self.c
        fwd, back = [values, grads], [values.reversed()]
        src, dst = [self.len_a] * 2, [block] * 2
        self.rows = None
        if pieces_b is not None:
            check_tiling(pieces_b, 2 * r * m, "lora_B")
            self.len_b = int(pieces_b[rank, 1])
            first, end, self.head = owned_rows(int(pieces_b[rank, 0]), self.len_b, self.c)
            self.rows = end - first
            heads = boundary_route(r, pieces_b, rank)
            fwd += [heads, heads]
            back += [heads.reversed()]
            src += [self.len_b] * 2
            dst += [self.rows * self.c] * 2
        self.fwd = Plan(fwd, src, dst, world, device)
        back_src = [block] + ([self.rows * self.c] if self.rows is not None else [])
        back_dst = [self.len_a] + ([self.len_b] if self.rows is not None else [])
        self.back = Plan(back, back_src, back_dst, world, device)

    def read(self, a: Tensor, ga: Tensor, b: Tensor | None, gb: Tensor | None,
             all_to_all: AllToAll) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
        """(B rows, their gradient, Aᵀ rows, their gradient) from the flat pieces ``a``,
        ``ga`` of lora_A and ``b``, ``gb`` of lora_B (None without ``pieces_b``): one all-to-all.
        The V block of the Aᵀ gradient is zero."""
        srcs = [a, ga] if self.rows is None else [a, ga, b, gb]
        out = self.fwd.run(srcs, all_to_all)
        at, gat = out[0].view(self.n_rows, self.c), out[1].view(self.n_rows, self.c)
        if self.rows is None:
            return None, None, at, gat
        own = self.len_b - self.head  # my rows from their first element on
        out[2][:own], out[3][:own] = b[self.head:], gb[self.head:]
        return out[2].view(self.rows, self.c), out[3].view(self.rows, self.c), at, gat

    def write(self, b: Tensor | None, at: Tensor, all_to_all: AllToAll
              ) -> tuple[Tensor, Tensor | None]:
        """New values of this rank's pieces of lora_A and lora_B (None without ``pieces_b``)
        from the new row blocks ``b`` (rows × 2r) and ``at`` (n_j × 2r): one all-to-all."""
        srcs = [at.reshape(-1)] if self.rows is None else [at.reshape(-1), b.reshape(-1)]
        out = self.back.run(srcs, all_to_all)
        if self.rows is None:
            return out[0], None
        out[1][self.head:] = b.reshape(-1)[: self.len_b - self.head]
        return out[0], out[1]


def exchange_counts(r: int, n: int, piece_a: tuple[int, int], piece_b: tuple[int, int] | None,
                    rank: int, world: int) -> tuple[int, int]:
    """Elements this rank sends in the exchange (forward, back) for one adapter, from its own
    pieces alone (``piece_b`` None: lora_B rows are whole, no boundary rows).

    Forward: its lora_A piece, the part of it in the K block (gradients), and twice its lora_B
    head (values, gradients). Back: its whole column block of Aᵀ (n_j × 2r) and the elements of
    its last lora_B row that later ranks hold.
    """
    start, numel = piece_a
    k_part = max(0, min(start + numel, 2 * r * n) - max(start, r * n))
    block = (rank + 1) * n // world - rank * n // world  # my columns (see column_bounds)
    fwd, back = numel + k_part, 2 * r * block
    if piece_b is not None:
        first, end, head = owned_rows(*piece_b, 2 * r)
        own = min((end - first) * 2 * r, piece_b[1] - head)
        fwd += 2 * head
        back += (end - first) * 2 * r - own if end > first else 0
    return fwd, back
