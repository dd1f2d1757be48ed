"""`pb.sparsity`: both shares (prunable weights, all parameters), a table for print, a short repr."""

from __future__ import annotations

from torch import nn

import prunebound as pb


def test_print_gives_a_bounded_table_and_repr_one_line() -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(30)])
    pb.prune(model, "magnitude", 0.5)
    sp = pb.sparsity(model, input_shape=(4,))
    lines = str(sp).splitlines()
    assert lines[0] == "SparsityReport: prunable weights 50.0% zero (240 of 480; compression 2.00x)"
    assert lines[1] == "  all parameters 40.0% zero (240 of 600)"  # the 120 biases count too
    assert lines[2] == "  FLOPs per sample 960 dense, 480 sparse"
    assert lines[4].split() == ["0", "4x4", "8/16", "50.0%"]
    assert lines[-1] == "  ... 10 more layers" and len(lines) == 25
    r = repr(sp)
    assert "\n" not in r and len(r) < 300 and "layers=<30 layers>" in r
    assert sp.model_sparsity == 0.4 and sp.to_dict()["model_sparsity"] == 0.4
