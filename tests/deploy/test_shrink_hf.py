"""`shrink` of Hugging Face GPT-2 / BERT: pruned heads and MLP neurons physically removed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import HF_MLP, HF_TINY, hf_ids, hf_out, tiny_hf
from torch import nn

import prunebound as pb

HEADS, D, E = HF_TINY["heads"], HF_TINY["head_dim"], HF_TINY["hidden"]
V, P = HF_TINY["vocab"], HF_TINY["positions"]
MLP_IN = {"gpt2": "*mlp.c_fc", "bert": "*intermediate.dense"}


def expected_params(kind: str, heads: list[int], mlp: list[int]) -> int:
    """Parameters of a 2-layer tiny model with `heads[i]` heads and `mlp[i]` MLP neurons in
    layer i, counted by hand (GPT-2's lm_head is tied to wte: counted once)."""
    total = V * E + P * E + (2 * E if kind == "gpt2" else 2 * E + 2 * E + E * E + E)
    for h, f in zip(heads, mlp, strict=True):
        w = h * D
        total += 3 * (E * w + w)  # q, k, v weights and biases
        total += w * E + E  # output projection
        total += E * f + f + f * E + E  # MLP in (with bias) and out
        total += 2 * (2 * E)  # two LayerNorms
    return total


def _blocks(model: nn.Module, kind: str) -> list[nn.Module]:
    return list(model.transformer.h if kind == "gpt2" else model.encoder.layer)


def sizes(model: nn.Module, kind: str) -> tuple[list[int], list[int]]:
    """(heads, MLP width) per layer, read from the attributes forward uses, checked coherent."""
    heads, mlp = [], []
    for b in _blocks(model, kind):
        if kind == "gpt2":
            a = b.attn
            h = a.num_heads
            assert a.split_size == h * D and a.head_dim == D
            assert (a.c_attn.nx, a.c_attn.nf) == (E, 3 * h * D) and a.c_attn.weight.shape == (
                E,
                3 * h * D,
            )
            assert a.c_attn.bias.shape == (3 * h * D,) and a.c_proj.weight.shape == (h * D, E)
            assert a.c_proj.nx == h * D
            f = b.mlp.c_fc.nf
            assert b.mlp.c_fc.weight.shape == (E, f) and b.mlp.c_proj.weight.shape == (f, E)
        else:
            s = b.attention.self
            h = s.num_attention_heads
            assert s.all_head_size == h * D and s.attention_head_size == D
            for lin in (s.query, s.key, s.value):
                assert lin.weight.shape == (h * D, E) and lin.out_features == h * D
            assert b.attention.output.dense.weight.shape == (E, h * D)
            f = b.intermediate.dense.out_features
            assert b.output.dense.weight.shape == (E, f) and b.output.dense.in_features == f
        heads.append(h)
        mlp.append(f)
    return heads, mlp


def _prune(model: nn.Module, kind: str, what: str) -> None:
    if what in ("heads", "both"):
        pb.prune(model, "head", 0.5, layers=[_blocks_attn(kind, 0)])  # 2 heads of layer 0
        pb.prune(model, "head", 0.25, layers=[_blocks_attn(kind, 1)])  # 1 head of layer 1
    if what in ("neurons", "both"):
        pb.prune(model, "neuron", 0.25, layers=[MLP_IN[kind]])


def _blocks_attn(kind: str, i: int) -> str:
    return f"transformer.h.{i}.attn" if kind == "gpt2" else f"encoder.layer.{i}.attention.self"


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(before: dict[str, torch.Tensor], model: nn.Module) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(
        torch.equal(v, after[k]) for k, v in before.items()
    )


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("what", ["heads", "neurons", "both"])
def test_shrunk_model_computes_the_masked_function_with_exact_sizes(
    kind: str, dtype: torch.dtype, what: str
) -> None:
    model = tiny_hf(kind).to(dtype)
    _prune(model, kind, what)
    state = _state(model)
    ids = hf_ids()
    small = pb.shrink(model, ids)
    assert _same(state, model), "shrink changed the masked model"
    heads = [2, 3] if what != "neurons" else [HEADS, HEADS]
    f = HF_MLP[kind]
    mlp = [f - round(0.25 * f)] * 2 if what != "heads" else [f, f]
    assert sizes(small, kind) == (heads, mlp)
    assert sum(p.numel() for p in small.parameters()) == expected_params(kind, heads, mlp)
    assert sum(p.numel() for p in model.parameters()) == expected_params(kind, [HEADS] * 2, [f] * 2)
    assert not pb.masks(small)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for seed in (1, 2):  # the example input and another one
        x = hf_ids(seed)
        torch.testing.assert_close(hf_out(small, x), hf_out(model, x), rtol=tol, atol=tol)
    assert small.config.to_dict() == model.config.to_dict()  # per-layer widths: not in config


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_default_neuron_pruning_of_every_layer_shrinks_exactly(kind: str) -> None:
    """Plain "neuron" on every layer (q/k/v units, residual outputs too): the MLP neurons go
    (their constant act(bias) folded), the rest stays baked as zeros; same function."""
    model = tiny_hf(kind).double()
    pb.prune(model, "neuron", 0.3)
    small = pb.shrink(model, hf_ids())
    f = HF_MLP[kind]
    assert sizes(small, kind)[1] == [f - round(0.3 * f)] * 2
    torch.testing.assert_close(hf_out(small, hf_ids(3)), hf_out(model, hf_ids(3)))


def test_a_head_with_zero_v_weights_goes_and_its_v_bias_is_folded() -> None:
    """A head whose v weights are zero outputs its v bias whatever q and k (softmax rows sum to
    1): it is removed and that constant moves into c_proj's bias, exactly."""
    model = tiny_hf("gpt2").double()
    with torch.no_grad():  # head 1 of layer 0: v weights zero, v bias, q and k kept
        model.transformer.h[0].attn.c_attn.weight[:, 2 * E + D : 2 * E + 2 * D] = 0
    small = pb.shrink(model, hf_ids())
    assert sizes(small, "gpt2")[0] == [3, 4]
    a, b = model.transformer.h[0].attn.c_proj, small.transformer.h[0].attn.c_proj
    vb = model.transformer.h[0].attn.c_attn.bias[2 * E + D : 2 * E + 2 * D]
    torch.testing.assert_close(b.bias, a.bias + vb @ a.weight[D : 2 * D])
    torch.testing.assert_close(hf_out(small, hf_ids(4)), hf_out(model, hf_ids(4)))


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_a_layer_with_every_head_or_neuron_zero_is_refused_and_untouched(kind: str) -> None:
    model = tiny_hf(kind)
    with torch.no_grad():
        if kind == "gpt2":
            model.transformer.h[1].attn.c_proj.weight.zero_()
        else:
            model.encoder.layer[1].attention.output.dense.weight.zero_()
    state = _state(model)
    with pytest.raises(ValueError, match=f"every head of '{_blocks_attn(kind, 1)}'"):
        pb.shrink(model, hf_ids())
    assert _same(state, model)
    model = tiny_hf(kind)
    pb.prune(model, "neuron", 1.0, layers=[MLP_IN[kind].replace("*", "*.0.", 1)])
    state = _state(model)
    with pytest.raises(ValueError, match="every neuron of"):
        pb.shrink(model, hf_ids())
    assert _same(state, model)


def test_bad_example_inputs_are_refused() -> None:
    model = tiny_hf("gpt2")
    pb.prune(model, "head", 0.5)
    state = _state(model)
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        pb.shrink(model, "ids")
    with pytest.raises(ValueError, match="cannot run on example_inputs"):
        pb.shrink(model, torch.zeros(2, 3, 4))  # float "ids": the embedding refuses them
    assert _same(state, model)


def test_dict_example_inputs_and_the_training_mode_are_kept() -> None:
    model = tiny_hf("bert")
    pb.prune(model, "head", 0.5)
    model.train()
    ids = hf_ids()
    small = pb.shrink(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert small.training and model.training
    small.eval(), model.eval()
    torch.testing.assert_close(hf_out(small, ids), hf_out(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_shrunk_file_round_trip(kind: str, tmp_path: Path) -> None:
    model = tiny_hf(kind)
    _prune(model, kind, "both")
    small = pb.shrink(model, hf_ids())
    path = pb.save_shrunk(small, tmp_path / "small.safetensors")
    fresh = tiny_hf(kind, seed=9)  # the class with its config widths, other weights
    before = _state(fresh)
    loaded = pb.load_shrunk(fresh, path)
    assert _same(before, fresh)
    assert sizes(loaded, kind) == sizes(small, kind)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in small.parameters())
    assert torch.equal(hf_out(loaded, hf_ids(5)), hf_out(small, hf_ids(5)))
    if kind == "gpt2":  # the tie survives: one tensor in the file, one parameter after load
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with pytest.raises(ValueError, match="do not match the model's"):
        pb.load_shrunk(pb.models.mlp([4, 4, 2]), path)  # another architecture
