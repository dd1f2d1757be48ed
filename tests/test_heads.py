"""The "head" method: whole attention heads of HF GPT-2 / BERT, masked so that they output 0."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import HF_TINY, hf_ids, hf_out, make_mlp, tiny_hf
from torch import nn

import prunebound as pb
from prunebound._masks import mask_module

HEADS, D, E = HF_TINY["heads"], HF_TINY["head_dim"], HF_TINY["hidden"]
ATTN = {"gpt2": "transformer.h.{}.attn", "bert": "encoder.layer.{}.attention.self"}


def _parts(
    model: nn.Module, kind: str, layer: int, h: int
) -> list[tuple[nn.Module, str, int, slice]]:
    """(module, tensor, axis, units) of every tensor slice that belongs to head `h` of `layer`,
    written out by hand from the transformers layouts (not from prunebound.heads)."""
    s = slice(h * D, (h + 1) * D)
    if kind == "gpt2":
        attn = model.transformer.h[layer].attn
        qkv = [slice(b * E + h * D, b * E + (h + 1) * D) for b in range(3)]  # q | k | v columns
        out = [(attn.c_attn, "weight", 1, u) for u in qkv] + [
            (attn.c_attn, "bias", 0, u) for u in qkv
        ]
        return [*out, (attn.c_proj, "weight", 0, s)]  # Conv1D weight: (in, out)
    att = model.encoder.layer[layer].attention
    lins = (att.self.query, att.self.key, att.self.value)
    out = [(m, t, 0, s) for m in lins for t in ("weight", "bias")]
    return [*out, (att.output.dense, "weight", 1, s)]


def _keep(m: nn.Module, tensor: str, axis: int, units: slice) -> torch.Tensor:
    mm = mask_module(m, tensor)
    t = getattr(m, tensor)
    keep = mm.mask if mm is not None else torch.ones_like(t, dtype=torch.bool)
    return keep.movedim(axis, 0)[units]


def pruned_heads(model: nn.Module, kind: str) -> list[list[int]]:
    """Per layer, the heads masked whole; fails if any head is only partly masked."""
    out = []
    for layer in range(2):
        gone = []
        for h in range(HEADS):
            keeps = [_keep(*p) for p in _parts(model, kind, layer, h)]
            if all(not bool(k.any()) for k in keeps):
                gone.append(h)
            else:
                assert all(bool(k.all()) for k in keeps), f"head {h} of layer {layer} partly masked"
        out.append(gone)
    return out


def hand_scores(model: nn.Module, kind: str) -> list[float]:
    """L2 norm of each head's q, k, v weight units and output columns, (layer, head) order."""
    scores = []
    for layer in range(2):
        for h in range(HEADS):
            sq = 0.0
            for m, t, axis, units in _parts(model, kind, layer, h):
                if t == "weight":
                    sq += float(
                        (pb.original_weight(m).detach().movedim(axis, 0)[units].double() ** 2).sum()
                    )
            scores.append(math.sqrt(sq))
    return scores


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(before: dict[str, torch.Tensor], model: nn.Module) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(
        torch.equal(v, after[k]) for k, v in before.items()
    )


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("amount", [0.25, 0.5, 0.75])
def test_layer_scope_prunes_round_amount_heads_per_layer_lowest_first(
    kind: str, amount: float
) -> None:
    model = tiny_hf(kind)
    scores = hand_scores(model, kind)
    pb.prune(model, "head", amount)
    gone = pruned_heads(model, kind)
    k = round(amount * HEADS)
    for layer in range(2):
        own = scores[layer * HEADS : (layer + 1) * HEADS]
        assert gone[layer] == sorted(sorted(range(HEADS), key=own.__getitem__)[:k])
    # only attention layers are masked: the MLP and the output layer are left alone
    names = {ATTN[kind].format(i) for i in range(2)}
    for n in pb.masks(model):
        assert any(n.startswith(a.rpartition(".self")[0] if kind == "bert" else a) for a in names)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("amount", [0.25, 0.375])
def test_global_scope_prunes_the_lowest_heads_of_all_layers(kind: str, amount: float) -> None:
    model = tiny_hf(kind, seed=3)
    scores = hand_scores(model, kind)
    pb.prune(model, "head", amount, scope="global")
    gone = pruned_heads(model, kind)
    flat = sorted(layer * HEADS + h for layer in range(2) for h in gone[layer])
    k = round(amount * 2 * HEADS)
    assert flat == sorted(sorted(range(2 * HEADS), key=scores.__getitem__)[:k])


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_heads_compose_among_survivors_and_never_revive(kind: str) -> None:
    model = tiny_hf(kind)
    pb.prune(model, "head", 0.25)  # 1 of 4 per layer
    first = pruned_heads(model, kind)
    pb.prune(model, "head", 0.5)  # round(0.5 * 3) = 2 more
    second = pruned_heads(model, kind)
    for a, b in zip(first, second, strict=True):
        assert set(a) <= set(b) and len(b) == 3


def test_pruned_gpt2_heads_add_exactly_zero() -> None:
    """The masked model equals the dense model whose pruned heads' outputs are simply dropped
    (c_proj input rows zeroed, q, k, v untouched), and those inputs of c_proj are exactly 0."""
    model = tiny_hf("gpt2").double()
    dense = copy.deepcopy(model)
    pb.prune(model, "head", 0.5)
    gone = pruned_heads(model, "gpt2")
    seen: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.transformer.h):
        block.attn.c_proj.register_forward_pre_hook(lambda _m, a, i=i: seen.__setitem__(i, a[0]))
        with torch.no_grad():
            for h in gone[i]:
                dense.transformer.h[i].attn.c_proj.weight[h * D : (h + 1) * D] = 0
    ids = hf_ids()
    out = hf_out(model, ids)
    for i in range(2):
        for h in gone[i]:
            assert torch.equal(
                seen[i][..., h * D : (h + 1) * D], torch.zeros_like(seen[i][..., :D])
            )
    torch.testing.assert_close(out, hf_out(dense, ids), rtol=1e-10, atol=1e-10)


def test_pruned_bert_heads_match_transformers_prune_linear_layer() -> None:
    """The masked BERT equals the BERT whose heads transformers' own `prune_linear_layer` cut."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    model = tiny_hf("bert").double()
    cut = copy.deepcopy(model)
    pb.prune(model, "head", 0.5)
    gone = pruned_heads(model, "bert")
    for i, layer in enumerate(cut.encoder.layer):
        kept = [h for h in range(HEADS) if h not in gone[i]]
        idx = torch.tensor([h * D + j for h in kept for j in range(D)])
        s = layer.attention.self
        for part in ("query", "key", "value"):
            setattr(
                s, part, pytorch_utils.prune_linear_layer(getattr(s, part), idx, dim=0).double()
            )
        o = layer.attention.output
        o.dense = pytorch_utils.prune_linear_layer(o.dense, idx, dim=1).double()
        s.num_attention_heads, s.all_head_size = len(kept), len(kept) * D
    ids = hf_ids()
    torch.testing.assert_close(hf_out(model, ids), hf_out(cut, ids), rtol=1e-10, atol=1e-10)


def test_layers_select_attention_modules_by_name_glob_or_type() -> None:
    model = tiny_hf("gpt2")
    pb.prune(model, "head", 0.5, layers=["transformer.h.1.attn"])
    assert [len(g) for g in pruned_heads(model, "gpt2")] == [0, 2]
    model = tiny_hf("gpt2")
    pb.prune(model, "head", 0.5, layers=["*h.0.attn.c_proj"])
    assert [len(g) for g in pruned_heads(model, "gpt2")] == [2, 0]
    model = tiny_hf("bert")
    pb.prune(model, "head", 0.25, layers=[type(model.encoder.layer[0].attention.self)])
    assert [len(g) for g in pruned_heads(model, "bert")] == [1, 1]


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_bad_input_is_refused_and_the_model_is_untouched(kind: str) -> None:
    model = tiny_hf(kind)
    pb.prune(model, "head", 0.5)  # 2 of 4 heads left per layer
    state = _state(model)
    first = ATTN[kind].format(0)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="amount must be in"):
            pb.prune(model, "head", bad)
    with pytest.raises(ValueError, match=rf"heads of '{first}'.*would remove every head"):
        pb.prune(model, "head", 1.0)
    with pytest.raises(ValueError, match=rf"heads of '{first}'.*would remove every head"):
        pb.prune(model, "head", 0.75)  # round(0.75 * 2) = 2: both survivors
    with pytest.raises(ValueError, match="method 'head' takes amount"):
        pb.prune(model, "head", counts={first: 1})
    with pytest.raises(ValueError, match="matches no attention module"):
        pb.prune(model, "head", 0.5, layers=["nothing.*"])
    with pytest.raises(ValueError, match="coupled=True traces plain PyTorch"):
        pb.prune(model, "neuron", 0.5, coupled=True, example_inputs=hf_ids())
    assert _same(state, model)


def test_global_scope_that_would_empty_a_layer_names_it() -> None:
    model = tiny_hf("gpt2")
    with torch.no_grad():  # every head of layer 0 scores below every head of layer 1
        for p in model.transformer.h[0].attn.parameters():
            p.mul_(0.01)
    state = _state(model)
    with pytest.raises(
        ValueError, match=r"heads of 'transformer.h.0.attn'.*would remove every head"
    ):
        pb.prune(model, "head", 0.5, scope="global")
    assert _same(state, model)


def test_a_model_without_hf_attention_or_with_nan_is_refused_untouched() -> None:
    net = make_mlp()
    state = _state(net)
    with pytest.raises(ValueError, match="has no Hugging Face GPT-2 or BERT self-attention"):
        pb.prune(net, "head", 0.5)
    assert _same(state, net)
    model = tiny_hf("bert")
    with torch.no_grad():
        model.encoder.layer[1].attention.self.key.weight[0, 0] = float("nan")
    state = _state(model)
    with pytest.raises(ValueError, match=r"encoder.layer.1.attention.self.key.*NaN"):
        pb.prune(model, "head", 0.5)
    assert all(torch.equal(v, model.state_dict()[k]) or v.isnan().any() for k, v in state.items())
    assert not pb.masks(model)
