"""Shared test helpers: small seeded models and experiments, a GPT-2 config without download.

Imported by test modules as `helpers` (pytest's `pythonpath` has `tests/`); fixtures that use
them live in `conftest.py`.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import prunebound.training.experiment as ex
from prunebound.training.config import DataSpec, Experiment, ModelSpec
from prunebound.training.experiment import RunResult, run
from prunebound.training.loop import TrainConfig
from prunebound.training.schedule import Schedule


def make_mlp(seed: int = 0, widths: tuple[int, ...] = (12, 16, 8, 3)) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g))
            lin.bias.copy_(torch.randn(b, generator=g))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def batch_mlp(widths: list[int], batch: Any, i: int) -> tuple[nn.Sequential, list[nn.Linear]]:
    """`pb.models.mlp(widths)` holding network `i` of a `check.batch` sample, and its Linears."""
    import prunebound as pb

    model = pb.models.mlp(widths)
    lins = [m for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for lin, w, b in zip(lins, batch.weights, batch.biases, strict=True):
            lin.weight.copy_(w[i])
            assert b is not None
            lin.bias.copy_(b[i])
    return model, lins


def make_cnn(seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net


def gpt2_config(*, n_embd: int, vocab: int, positions: int, heads: int = 2) -> Any:
    """A 2-layer GPT-2 config of 2 heads (no download); skips the test without transformers."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install 'prunebound[hf]')"
    )
    return transformers.GPT2Config(
        n_layer=2,
        n_embd=n_embd,
        n_head=heads,
        vocab_size=vocab,
        n_positions=positions,
        bos_token_id=0,
        eos_token_id=0,
    )


def tiny_experiment(out: Path, *, seed: int, **schedule: Any) -> Experiment:
    """An MLP on 160 digits, 2 epochs of SGD, 2 iterative rounds to 75%: a run of seconds."""
    sched = {"kind": "iterative", "target_sparsity": 0.75, "rounds": 2, **schedule}
    return Experiment(
        model=ModelSpec("mlp", {"widths": (64, 16, 10)}),
        data=DataSpec("digits", max_train=160, max_test=100),
        train=TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.05),
        schedule=Schedule(**sched),
        seed=seed,
        out_dir=str(out),
        quiet=True,
    )


def conv_bn_flatten_net() -> nn.Sequential:
    """Conv (bias) -> BatchNorm -> ReLU -> Conv -> ReLU -> Flatten -> Linear, for (2, 6, 6)
    inputs: one group with a BatchNorm, one whose consumer reads 16 columns per channel."""
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
    )  # fmt: skip


def with_bn_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """`model` in eval mode with non-trivial BatchNorm affine parameters and running statistics
    (as after training): random gamma/beta, then one training-mode pass over `x`."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
        model.train()
        model(x)
    return model.eval()


def run_keeping_checkpoints(
    exp: Experiment, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[RunResult, list[Path]]:
    """`run(exp)`, with a copy (tmp_path/ckpt<i>.safetensors) of every run checkpoint it writes,
    in order: the states a killed run could resume from."""
    copies: list[Path] = []
    write = ex.write_checkpoint

    def write_and_copy(path: Path, *args: Any, **kwargs: Any) -> None:
        write(path, *args, **kwargs)
        copies.append(tmp_path / f"ckpt{len(copies)}.safetensors")
        shutil.copy(path, copies[-1])

    monkeypatch.setattr(ex, "write_checkpoint", write_and_copy)
    full = run(exp, write_plots=False)
    monkeypatch.undo()
    return full, copies


#: sizes of `tiny_hf` models: hidden width, heads, head width, MLP width, vocabulary, positions
HF_TINY = {"hidden": 32, "heads": 4, "head_dim": 8, "vocab": 64, "positions": 16}
HF_MLP = {"gpt2": 128, "bert": 64}


def tiny_hf(kind: str, *, seed: int = 0) -> nn.Module:
    """A seeded 2-layer, 4-head Hugging Face model in eval mode, built offline: "gpt2" (a
    `GPT2LMHeadModel`, lm_head tied to wte, MLP 128) or "bert" (a `BertModel`, MLP 64). Weights
    are N(0, 0.5^2) from `seed` (no global RNG), so score ties are measure-zero."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install 'prunebound[hf]')"
    )
    t = HF_TINY
    if kind == "gpt2":
        cfg = gpt2_config(
            n_embd=t["hidden"], vocab=t["vocab"], positions=t["positions"], heads=t["heads"]
        )
        model: nn.Module = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.BertConfig(
            num_hidden_layers=2,
            hidden_size=t["hidden"],
            num_attention_heads=t["heads"],
            intermediate_size=HF_MLP["bert"],
            vocab_size=t["vocab"],
            max_position_embeddings=t["positions"],
        )
        model = transformers.BertModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def hf_ids(seed: int = 1) -> torch.Tensor:
    """A (2, 10) batch of token ids for `tiny_hf` models."""
    return torch.randint(
        0, HF_TINY["vocab"], (2, 10), generator=torch.Generator().manual_seed(seed)
    )


def hf_out(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits (GPT-2) or last hidden states (BERT) of `model` on `ids`, without gradients."""
    with torch.no_grad():
        res = model(input_ids=ids)
    return res.logits if hasattr(res, "logits") else res.last_hidden_state
