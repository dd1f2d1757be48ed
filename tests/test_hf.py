"""Hugging Face transformers models built from a config (no downloads): BERT (nn.Linear) and
GPT-2 (transposed Conv1D) prune with every method; embeddings and tied weights; save/load."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tp

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'prunebound[hf]')"
)

from helpers import gpt2_config  # noqa: E402

import prunebound as pb  # noqa: E402
from prunebound.hf import block_layers, from_pretrained, save_pretrained  # noqa: E402
from prunebound.layer_types import output_axis  # noqa: E402
from prunebound.outputs import output_layers  # noqa: E402

VOCAB, POS, EMBD = 64, 16, 32
GPT2_CONV = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Seeded weights of spread-out magnitudes (no global RNG): ties are then measure-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def gpt2(seed: int = 0, lm_head: bool = True) -> nn.Module:
    cfg = gpt2_config(n_embd=EMBD, vocab=VOCAB, positions=POS)
    cls = transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model
    return _init(cls(cfg), seed)


def bert(seed: int = 0) -> nn.Module:
    cfg = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=EMBD,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=POS,
    )
    return _init(transformers.BertModel(cfg), seed)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        res = model(input_ids=_ids())
    return res.logits if hasattr(res, "logits") else res.last_hidden_state


def _zeros(model: nn.Module) -> dict[str, int]:
    return {r.name: r.zeros for r in pb.sparsity(model).layers}


GPT2_NAMES = [f"transformer.h.{i}.{s}" for i in range(2) for s in GPT2_CONV]
BERT_ATTN = ("attention.self.query", "attention.self.key", "attention.self.value")
BERT_ATTN += ("attention.output.dense",)
BERT_MLP = ("intermediate.dense", "output.dense")
BERT_NAMES = [f"encoder.layer.{i}.{s}" for i in range(2) for s in BERT_ATTN + BERT_MLP]
BERT_NAMES.append("pooler.dense")


def test_default_selection_skips_embeddings_and_tied_head() -> None:
    g = gpt2()
    assert list(pb.prunable_layers(g)) == GPT2_NAMES  # not wte/wpe, not lm_head (tied to wte)
    c = g.transformer.h[0].attn.c_attn
    assert type(c).__name__ == "Conv1D" and tuple(c.weight.shape) == (EMBD, 3 * EMBD)
    assert output_axis(c) == 1 and output_axis(g.lm_head) == 0
    assert list(pb.prunable_layers(bert())) == BERT_NAMES


@pytest.mark.parametrize("amount", [0.3, 0.9])
def test_layer_magnitude_exact_counts_and_torch_oracle(amount: float) -> None:
    for model in (gpt2(), bert()):
        ref = copy.deepcopy(model)
        pb.prune(model, "magnitude", amount)
        layers = pb.prunable_layers(model)
        for name, m in pb.prunable_layers(ref).items():
            n = m.weight.numel()
            assert _zeros(model)[name] == round(amount * n), name
            tp.l1_unstructured(m, "weight", amount=amount)
            assert torch.equal(pb.masks(model)[name], m.weight_mask.bool()), name
            assert torch.equal(layers[name].weight, m.weight), name  # same effective weight
        out = _out(model)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, _out(ref), rtol=0, atol=0)  # torch-pruned twin agrees


def test_global_magnitude_equals_torch_global_unstructured() -> None:
    for model in (gpt2(), bert()):
        ref = copy.deepcopy(model)
        pb.prune(model, "magnitude", 0.8, scope="global")
        params = [(m, "weight") for m in pb.prunable_layers(ref).values()]
        tp.global_unstructured(params, pruning_method=tp.L1Unstructured, amount=0.8)
        total = sum(m.weight.numel() for m, _ in params)
        assert pb.sparsity(model).zeros == round(0.8 * total)
        for (name, keep), (m, _) in zip(pb.masks(model).items(), params, strict=True):
            assert torch.equal(keep, m.weight_mask.bool()), name
        torch.testing.assert_close(_out(model), _out(ref), rtol=0, atol=0)


def test_random_exact_counts_and_bernoulli_rate() -> None:
    for make in (gpt2, bert):
        model = make()
        pb.prune(model, "random", 0.4, seed=3)
        for r in pb.sparsity(model).layers:
            assert r.zeros == round(0.4 * r.total), r.name
        twin = make()
        pb.prune(twin, "random", 0.4, seed=3)
        assert all(
            torch.equal(a, b)
            for a, b in zip(pb.masks(model).values(), pb.masks(twin).values(), strict=True)
        )
        assert torch.isfinite(_out(model)).all()

        model = make()
        pb.prune(model, "bernoulli", 0.4, seed=5)
        rep = pb.sparsity(model)
        sd = math.sqrt(rep.total * 0.4 * 0.6)  # binomial count; 6 sd: fails w.p. < 1e-8
        assert abs(rep.zeros - 0.4 * rep.total) < 6 * sd, (rep.zeros, rep.total)
        assert torch.isfinite(_out(model)).all()


def test_gpt2_neuron_prunes_whole_output_columns() -> None:
    model, ref = gpt2(lm_head=False), gpt2(lm_head=False)
    pb.prune(model, "neuron", 0.25)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.detach()))
        for n, m in pb.prunable_layers(model).items()
    ]
    _out(model)
    for h in hooks:
        h.remove()
    # GPT2Model (no head) cannot be fx-traced: its last layer's outputs are the model's output
    # (through the residual and ln_f), so it is left alone by default
    last = "h.1.mlp.c_proj"
    assert output_layers(model) == (last,)
    assert set(pb.masks(model)) == set(pb.prunable_layers(model)) - {last}
    for name, m in pb.prunable_layers(ref).items():
        if name == last:
            continue
        keep = pb.masks(model)[name]  # (in, out): a neuron is a column
        cols = keep.all(dim=0)
        assert torch.equal(keep, cols.expand_as(keep)), name  # whole columns, nothing partial
        assert int((~cols).sum()) == round(0.25 * m.weight.shape[1]), name
        tp.ln_structured(m, "weight", amount=0.25, n=2, dim=1)  # torch oracle on columns
        assert torch.equal(keep, m.weight_mask.bool()), name
        # a pruned output unit computes its bias alone, for every token
        bias = pb.prunable_layers(model)[name].bias
        out = seen[name][..., ~cols]
        torch.testing.assert_close(out, bias[~cols].expand_as(out), rtol=0, atol=0)


def test_bert_neuron_prunes_rows_and_filter_is_not_applicable() -> None:
    model = bert()
    pb.prune(model, "neuron", 0.5, layers=["encoder.*"])
    for name, keep in pb.masks(model).items():
        rows = keep.all(dim=1)
        assert torch.equal(keep, rows[:, None].expand_as(keep)), name
        assert int((~rows).sum()) == round(0.5 * keep.shape[0]), name
    assert torch.isfinite(_out(model)).all()
    for m in (gpt2(), bert()):
        with pytest.raises(ValueError, match="no prunable layer"):
            pb.prune(m, "filter", 0.5)
        assert not pb.is_pruned(m)


def test_layer_selection_by_glob_and_by_block() -> None:
    g = gpt2()
    pb.prune(g, "magnitude", 0.5, layers=["*.attn.*"])
    assert list(pb.masks(g)) == [
        f"transformer.h.{i}.attn.{s}" for i in range(2) for s in ("c_attn", "c_proj")
    ]
    assert block_layers(g, "mlp") == tuple(
        f"transformer.h.{i}.mlp.{s}" for i in range(2) for s in ("c_fc", "c_proj")
    )
    assert block_layers(g, "attention") == tuple(pb.masks(g))

    b = bert()
    mlp = block_layers(b, "mlp")
    assert mlp == tuple(f"encoder.layer.{i}.{s}" for i in range(2) for s in BERT_MLP)
    assert block_layers(b, "attention") == tuple(
        f"encoder.layer.{i}.{s}" for i in range(2) for s in BERT_ATTN
    )
    pb.prune(b, "magnitude", 0.5, layers=mlp)
    zeros = _zeros(b)
    assert list(pb.masks(b)) == list(mlp)
    assert all(
        zeros[n] == (round(0.5 * pb.original_weight(m).numel()) if n in mlp else 0)
        for n, m in pb.prunable_layers(b).items()
    )
    with pytest.raises(ValueError, match="part must be"):
        block_layers(b, "ffn")  # type: ignore[arg-type]


def test_embeddings_prunable_only_when_named() -> None:
    g = gpt2()
    with pytest.raises(ValueError, match="matches no"):  # globs never pick embeddings
        pb.prune(g, "magnitude", 0.5, layers=["transformer.wp*"])
    pb.prune(g, "magnitude", 0.5, layers=["transformer.wpe"])
    assert list(pb.masks(g)) == ["transformer.wpe"]
    assert _zeros(g) == {**dict.fromkeys(GPT2_NAMES, 0), "transformer.wpe": POS * EMBD // 2}
    assert torch.isfinite(_out(g)).all()
    with pytest.raises(ValueError, match="matches no Linear layer"):  # neuron: Linear only
        pb.prune(bert(), "neuron", 0.5, layers=[nn.Embedding])
    b = bert()
    pb.prune(b, "random", 0.25, layers=[nn.Embedding], seed=0)  # by type: all three
    emb = [n for n, m in b.named_modules() if isinstance(m, nn.Embedding)]
    assert list(pb.masks(b)) == emb and len(emb) == 3
    for n in emb:
        w = b.get_submodule(n).weight
        assert int((w == 0).sum()) == round(0.25 * w.numel()), n


def test_tied_head_refused_alone_and_pruned_once_with_its_twin() -> None:
    g = gpt2()
    before = {k: v.clone() for k, v in g.state_dict().items()}
    for layers in (["lm_head"], [nn.Embedding], ["transformer.wte"]):
        with pytest.raises(ValueError, match="tied/shared"):
            pb.prune(g, "magnitude", 0.5, layers=layers)
        assert not pb.is_pruned(g)
        assert all(torch.equal(v, g.state_dict()[k]) for k, v in before.items())

    pb.prune(g, "magnitude", 0.5, layers=["transformer.wte", "lm_head"])
    m = pb.masks(g)
    assert torch.equal(m["lm_head"], m["transformer.wte"])
    assert g.lm_head.weight.equal(g.transformer.wte.weight)
    assert int((~m["lm_head"]).sum()) == VOCAB * EMBD // 2  # one weight, pruned once
    ref = gpt2()
    tp.l1_unstructured(ref.lm_head, "weight", amount=0.5)
    assert torch.equal(m["lm_head"], ref.lm_head.weight_mask.bool())

    g = gpt2()
    pb.prune(
        g, "magnitude", 0.5, scope="global", layers=["transformer.wte", "lm_head", *GPT2_NAMES]
    )
    rep = pb.sparsity(g)
    distinct = VOCAB * EMBD + sum(
        pb.original_weight(pb.prunable_layers(g)[n]).numel() for n in GPT2_NAMES
    )
    assert rep.total == distinct and rep.zeros == round(0.5 * distinct)  # tied weight counted once
    assert torch.equal(pb.masks(g)["lm_head"], pb.masks(g)["transformer.wte"])
    with pytest.raises(ValueError, match="same count"):
        pb.prune(gpt2(), "magnitude", counts={"lm_head": 3, "transformer.wte": 4})


@pytest.mark.parametrize("make", [gpt2, bert])
def test_save_load_round_trip_into_fresh_model(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = make(seed=0)
    pb.prune(model, "magnitude", 0.7, scope="global")
    if make is gpt2:  # also the tied embedding/head, pruned once
        pb.prune(model, "random", 0.5, layers=["transformer.wte", "lm_head"], seed=1)
        pb.prune(model, "neuron", 0.25, layers=["*.mlp.*"])
    expected = _out(model)
    path = pb.save(model, tmp_path / "pruned.safetensors")
    fresh = make(seed=1)  # same config, other weights
    assert not torch.equal(_out(fresh), expected)
    pb.load(fresh, path)
    torch.testing.assert_close(_out(fresh), expected, rtol=0, atol=0)
    assert pb.masks(fresh).keys() == pb.masks(model).keys()
    assert all(torch.equal(pb.masks(fresh)[k], v) for k, v in pb.masks(model).items())
    if make is gpt2:
        assert fresh.lm_head.weight.equal(fresh.transformer.wte.weight)  # still tied
        assert pb.original_weight(fresh.lm_head) is pb.original_weight(fresh.transformer.wte)


def test_core_does_not_import_transformers() -> None:
    code = "import sys, prunebound, prunebound.hf; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("make", [gpt2, bert])
def test_save_pretrained_from_pretrained_keeps_sparsity(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = make(seed=0)
    pb.prune(model, "magnitude", 0.9)
    if make is gpt2:  # also the tied embedding/head, pruned once
        pb.prune(model, "random", 0.5, layers=["transformer.wte", "lm_head"], seed=1)
    expected, nonzero = _out(model), pb.sparsity(model).model_nonzero
    save_pretrained(model, tmp_path / "hf")
    plain = type(model).from_pretrained(tmp_path / "hf").eval()  # no prunebound involved
    assert not pb.is_pruned(plain)
    # the pruned weights are zeros, not re-initialised
    assert pb.sparsity(plain).model_nonzero == nonzero < 0.3 * pb.sparsity(plain).model_params
    torch.testing.assert_close(_out(plain), expected, rtol=0, atol=0)
    again = from_pretrained(type(model), tmp_path / "hf").eval()
    assert pb.masks(again).keys() == pb.masks(model).keys()
    assert all(torch.equal(pb.masks(again)[k], v) for k, v in pb.masks(model).items())
    torch.testing.assert_close(_out(again), expected, rtol=0, atol=0)
    if make is gpt2:
        assert pb.original_weight(again.lm_head) is pb.original_weight(again.transformer.wte)
    pb.reset(again), pb.reset(model)  # the values behind the masks came back too
    torch.testing.assert_close(_out(again), _out(model), rtol=0, atol=0)
