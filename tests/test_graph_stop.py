"""End-of-sequence handling of GraphDecoder.generate, on the host side (the
replays themselves need a GPU: tests/test_gpu.py)."""

from __future__ import annotations

import torch

from moe_infinity.graphs import _Stop


def _run(stop: _Stop, columns: list[list[int]], prompt_len: int = 2) -> torch.Tensor:
    seen = []
    for col in columns:
        if stop.done():
            break
        stop.see(torch.tensor(col).view(-1, 1))
        seen.append(col)
    ids = torch.cat([torch.zeros(len(columns[0]), prompt_len, dtype=torch.long), torch.tensor(seen).T], dim=1)
    return stop.finish(ids, prompt_len)


def test_rows_end_at_their_first_end_id_and_are_padded_after():
    stop = _Stop([5, 7], pad=0, batch=2)
    out = _run(stop, [[1, 2], [5, 3], [4, 7], [9, 9], [8, 8]])
    assert out.tolist() == [[0, 0, 1, 5, 0], [0, 0, 2, 3, 7]], "stops once both rows ended; row 0 padded after its end"


def test_pad_defaults_to_the_first_end_id_and_an_int_is_accepted():
    stop = _Stop(5, pad=None, batch=2)
    out = _run(stop, [[5, 1], [2, 3], [4, 5]])
    assert out.tolist() == [[0, 0, 5, 5, 5], [0, 0, 1, 3, 5]]


def test_no_end_id_keeps_every_token():
    stop = _Stop(None, pad=None, batch=1)
    out = _run(stop, [[5], [5], [1]])
    assert not stop.done()
    assert out.tolist() == [[0, 0, 5, 5, 1]]


def test_a_row_that_never_ends_keeps_decoding():
    stop = _Stop([3], pad=9, batch=2)
    out = _run(stop, [[3, 1], [4, 2], [5, 6]])
    assert not stop.done()
    assert out.tolist() == [[0, 0, 3, 9, 9], [0, 0, 1, 2, 6]]
