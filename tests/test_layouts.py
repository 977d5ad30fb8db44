"""The layout objects of ``riemann_zero.sharding.layouts`` seen from one process: the engine marks
decide the layout in a fixed order (first match wins), every name the byte model accepts turns
into exactly one layout, and a plain parameter's layout reads and writes the whole tensor.
The engines' own layouts are exercised end to end by tests/distributed/."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from riemann_zero.sharding import accounting
from riemann_zero.sharding.layouts import (
    FSDP2,
    LAYOUTS,
    LOCAL,
    ZERO3,
    ZERO12,
    layout_named,
    layout_of,
    stored_shape,
)
from riemann_zero.sharding.params import assign, local_values, shift_base


def test_engine_marks_decide_the_layout_first_match_wins():
    p = nn.Parameter(torch.zeros(3, 4))
    assert layout_of(p) is LOCAL and LOCAL.whole and not LOCAL.flat
    p._hp_mapping = None  # ZeRO-1/2 mark (this rank holds no piece)
    assert layout_of(p) is ZERO12
    p.ds_id = 0  # a ZeRO-3 mark wins over the ZeRO-1/2 one
    assert layout_of(p) is ZERO3
    assert [layout.claims(nn.Parameter(torch.zeros(1))) for layout in LAYOUTS] == [
        False, False, False, True]  # only the last (local) claims a plain parameter


def test_every_name_turns_into_one_layout():
    seen = {}
    for layout in LAYOUTS:
        assert layout.name in layout.names and layout.title
        for name in layout.names:
            assert name not in seen, f"{name!r} names two layouts"
            seen[name] = layout
            assert layout_named(name) is layout
    assert layout_named("zero2") is ZERO12 and layout_named("ddp") is LOCAL
    assert layout_named("fsdp2") is FSDP2
    with pytest.raises(ValueError, match=r"'zero12'.*but got 'zero4'"):
        layout_named("zero4")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.name)
def test_byte_model_takes_the_layout_or_its_name(layout):
    shapes = [(12, 10, 2), (4, 7, 1)]
    pieces = accounting.zero12_pieces(shapes, 3, 1) if layout is ZERO12 else None
    by_name = accounting.step_bytes(shapes, layout.name, 3, 1, pieces)
    assert accounting.step_bytes(shapes, layout, 3, 1, pieces) == by_name
    assert (sum(by_name.values()) == 0) == layout.whole
    assert (accounting.tensorion_step_bytes([40, 7], layout, 3)
            == accounting.tensorion_step_bytes([40, 7], layout.name, 3))
    if layout is ZERO12:  # DeepSpeed's flat cut is not a function of one adapter's shape
        with pytest.raises(ValueError, match="zero12_pieces"):
            accounting.step_bytes(shapes, layout, 3, 1)


def test_plain_parameter_piece_is_the_whole_tensor():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    p.grad = torch.randn(5, 3, dtype=torch.float64)
    piece = LOCAL.piece(p)
    assert (piece.start, piece.numel, piece.whole) == (0, 15, True)
    assert torch.equal(piece.grad, p.grad.reshape(-1))
    piece.value[0] = 7.0  # the piece's values are the parameter's (writable view)
    assert p[0, 0].item() == 7.0
    assert stored_shape(p) == (5, 3) and local_values(p) is p and LOCAL.group(p) is None


def test_assign_and_shift_base_on_a_plain_parameter():
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(6, 4, dtype=torch.float64), requires_grad=False)
    value = torch.randn(6, 4, dtype=torch.float64)
    assign(w, value)
    assert torch.equal(w.data, value)
    b0, a0 = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    shift_base(w, b0, a0)  # computed in fp32, as documented: exactly that rounding
    assert torch.equal(w.data, (value.float() - b0.float() @ a0.float()).double())
