"""Exported models on disk: safetensors holding only the nonzero weights and their indices.

File layout (`save_export`, format version 2):

- each Linear/Conv1d/Conv2d/Conv3d weight whose compressed form is smaller than the dense one
  (sparse layers always, dense-kernel layers with enough zeros) as three tensors `L.values`,
  `L.col_indices`, `L.crow_indices` (compressed sparse rows of the weight flattened to
  (out, in*kernel)); column indices are stored in 8 bits when the layer has <= 256 columns, in
  16 bits when it has <= 65536, row pointers in 16 bits when there are < 65536 values (both
  widened on load);
- every other floating tensor of >= 2 dimensions (transformers' GPT-2 `Conv1D` weights, of
  shape (in, out), embeddings, custom layers) likewise as `K.values`, `K.col_indices`,
  `K.crow_indices` (CSR of the tensor flattened to (shape[0], rest)) when that is smaller,
  listed with its shape in `tensors`;
- every other parameter and buffer under its `state_dict` key; a tensor held under several
  keys (tied weights: a language model's output head and its input embedding) is stored once,
  under its first key, and `aliases` maps each other key to it;
- JSON metadata: `format` ("prunebound-export"), `version`, `layers` (per layer: type, shape,
  kernel, storage, conv hyper-parameters), `tensors` ({key: {"shape"}}), `aliases` ({key:
  stored key}), `graph` (below), `report` and a SHA-256 `digest` of the tensors, so a corrupt
  file is refused rather than loaded.

Version 1 files (no `tensors` or `aliases`; only Linear/Conv2d layers compressed) still load.

`graph` describes a flat `nn.Sequential` whose children are Linear, Conv1d/2d/3d, the sparse
forms, or one of `GRAPH_TYPES` (activations, Flatten, pooling, Dropout, BatchNorm1d/2d, Softmax):
`load_export(path)` rebuilds such a model without its original class. Any other model (nested
blocks, custom modules) is saved with `graph` null and loads with `load_export(path, model=m)`,
where `m` is an instance of the original architecture (its weights are not used). Tied weights
are tied again on load (the alias keys get the stored key's very tensor).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunebound._files import digest, read_file, tied_keys, unshared, write_atomic
from prunebound._masks import is_pruned, remove
from prunebound.deploy.kernels import csr_tensor
from prunebound.deploy.reports import ExportReport, attach_report, attached_report
from prunebound.deploy.sparse import SparseConv2d, SparseLinear, check_csr, to_csr

__all__ = ["GRAPH_TYPES", "load_export", "save_export"]

FORMAT = "prunebound-export"
VERSION = "2"
_READABLE = ("1", VERSION)
_SPARSE_KEYS = ("values", "col_indices", "crow_indices")

# type name -> (class, constructor arguments read back from the instance's attributes)
GRAPH_TYPES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "ReLU": (nn.ReLU, ()),
    "Tanh": (nn.Tanh, ()),
    "Sigmoid": (nn.Sigmoid, ()),
    "SiLU": (nn.SiLU, ()),
    "Identity": (nn.Identity, ()),
    "GELU": (nn.GELU, ("approximate",)),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)),
    "ELU": (nn.ELU, ("alpha",)),
    "Softmax": (nn.Softmax, ("dim",)),
    "LogSoftmax": (nn.LogSoftmax, ("dim",)),
    "Dropout": (nn.Dropout, ("p",)),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "AvgPool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode")),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "BatchNorm1d": (nn.BatchNorm1d, ("num_features", "eps", "momentum", "affine")),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine")),
}
_CONV_ARGS = ("stride", "padding", "dilation", "groups", "padding_mode")
_DENSE_LAYERS: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
}


def _layer_meta(m: nn.Module) -> dict[str, Any] | None:
    """Metadata of a Linear/Conv1d/2d/3d (dense or sparse) layer; None for other modules."""
    if isinstance(m, SparseLinear | SparseConv2d):
        meta: dict[str, Any] = {
            "type": "Linear" if isinstance(m, SparseLinear) else "Conv2d",
            "shape": list(m.weight_shape),
            "kernel": m.kernel,
            "bias": m.bias is not None,
        }
        if isinstance(m, SparseConv2d):
            conv = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation}
            meta["conv"] = {**conv, "groups": 1, "padding_mode": "zeros"}
        return meta
    if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
        meta = {
            "type": type(m).__name__,
            "shape": list(m.weight.shape),
            "kernel": "dense",
            "bias": m.bias is not None,
        }
        if not isinstance(m, nn.Linear):
            meta["conv"] = {k: getattr(m, k) for k in _CONV_ARGS}
        return meta
    return None


def _rebuildable(m: nn.Module) -> bool:
    """A layer `_placeholder` can rebuild from its metadata: a sparse layer or a plain
    Linear/Conv1d/2d/3d (not a subclass, whose class the file does not record)."""
    return isinstance(m, SparseLinear | SparseConv2d) or _DENSE_LAYERS.get(
        type(m).__name__
    ) is type(m)


def _graph(model: nn.Module, layer_names: set[str]) -> list[dict[str, Any]] | None:
    """The layer graph of a flat Sequential of supported modules (or of one supported layer,
    the model itself: name ""), else None."""
    if "" in layer_names:
        return [{"name": "", "type": "layer"}] if _rebuildable(model) else None
    if type(model) is not nn.Sequential:
        return None
    graph: list[dict[str, Any]] = []
    for name, child in model.named_children():
        kind = type(child).__name__
        if name in layer_names and _rebuildable(child):
            graph.append({"name": name, "type": "layer"})
        elif kind in GRAPH_TYPES and type(child) is GRAPH_TYPES[kind][0]:
            args = {a: getattr(child, a) for a in GRAPH_TYPES[kind][1]}
            graph.append({"name": name, "type": kind, **args})
        else:
            return None
    return graph


def _encode(
    csr: tuple[torch.Tensor, torch.Tensor, torch.Tensor], shape: Sequence[int]
) -> dict[str, torch.Tensor] | None:
    """File tensors of a CSR weight if smaller than the dense weight, else None."""
    crow, col, values = csr
    cols = math.prod(shape[1:])
    # the narrowest index type that holds the indices; 16-bit patterns are widened on load
    if cols <= 2**8:
        col = col.to(torch.uint8)
    elif cols <= 2**16:
        col = col.to(torch.int16)
    crow = crow.to(torch.int16 if values.numel() < 2**16 else torch.int32)
    size = values.numel() * (values.element_size() + col.element_size())
    size += crow.numel() * crow.element_size()
    if size >= math.prod(shape) * values.element_size():
        return None
    return {"values": values, "col_indices": col, "crow_indices": crow}


def _dense(
    crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: Sequence[int]
) -> torch.Tensor:
    size = (shape[0], math.prod(shape[1:]))
    return csr_tensor(crow, col, values, size).to_dense().reshape(tuple(shape))


def save_export(model: nn.Module, path: str | Path) -> Path:
    """Write an exported model (from `export`) to safetensors; see the module doc for the layout.

    The write is atomic (temporary file, fsync, then rename). Tied weights are stored once.
    Returns the path. Raises ValueError for a model that still has masks (export it first).
    """
    path = Path(path)
    if is_pruned(model):
        raise ValueError("save_export: the model still has masks; save pb.export(model) instead")
    live = model.state_dict(keep_vars=True)
    aliases = tied_keys(live)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    done: set[str] = set(aliases)  # state_dict keys written (or, for aliases, not to write)
    for name, m in model.named_modules():
        meta = _layer_meta(m)
        if meta is None:
            continue
        prefix = f"{name}." if name else ""
        enc = None
        if isinstance(m, SparseLinear | SparseConv2d):
            csr = (m.crow_indices, m.col_indices, m.values)
            enc = _encode(csr, meta["shape"])
            if enc is None:
                tensors[prefix + "weight"] = _dense(*csr, meta["shape"])
            done.update(prefix + k for k in _SPARSE_KEYS)
        elif prefix + "weight" not in aliases:  # a tied weight is written under its first key
            enc = _encode(to_csr(m.weight), meta["shape"])
            if enc is not None:
                done.add(prefix + "weight")
        if enc is not None:
            tensors.update({prefix + k: t.contiguous() for k, t in enc.items()})
        meta["storage"] = "sparse" if enc is not None else "dense"
        layers[name] = meta
    compact: dict[str, dict[str, Any]] = {}
    for key, t in live.items():
        if key in done:
            continue
        t = t.detach()
        if t.is_floating_point() and t.dim() >= 2 and t.numel():
            enc = _encode(to_csr(t), t.shape)
            if enc is not None:  # a pruned weight of any other layer type, stored compactly
                tensors.update({f"{key}.{k}": v.contiguous() for k, v in enc.items()})
                compact[key] = {"shape": list(t.shape)}
                continue
        tensors[key] = t
    tensors = unshared(tensors)
    report = attached_report(model)
    meta_json = {
        "format": FORMAT,
        "version": VERSION,
        "layers": json.dumps(layers),
        "tensors": json.dumps(compact),
        "aliases": json.dumps(aliases),
        "graph": json.dumps(_graph(model, set(layers))),
        "report": json.dumps(report.to_dict() if report is not None else None),
        "digest": digest(tensors),
    }
    write_atomic(tensors, path, meta_json)
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of an export file, checked (format, digest)."""
    tensors, raw = read_file(path, "export file")
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path}: not a prunebound export (format {raw.get('format')!r})")
    if raw.get("version") not in _READABLE:
        raise ValueError(f"{path}: unsupported export version {raw.get('version')!r}")
    if raw.get("digest") != digest(tensors):
        raise ValueError(f"{path}: corrupt export file (tensors do not match their SHA-256)")
    try:
        meta = {k: json.loads(raw[k]) for k in ("layers", "graph", "report")}
        meta.update({k: json.loads(raw.get(k, "{}")) for k in ("tensors", "aliases")})
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt export metadata ({e})") from None
    return tensors, meta


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _placeholder(meta: dict[str, Any]) -> nn.Module:
    """A dense layer of the right shape on the meta device (its values come from the file)."""
    shape, bias = meta["shape"], meta["bias"]
    if meta["type"] == "Linear":
        return nn.Linear(shape[1], shape[0], bias=bias, device="meta")
    c = {k: _tuple(v) for k, v in meta["conv"].items()}
    c_in = shape[1] * c["groups"]
    conv = _DENSE_LAYERS[meta["type"]]
    return conv(c_in, shape[0], tuple(shape[2:]), **c, bias=bias, device="meta")


def _from_graph(graph: list[dict[str, Any]], layers: dict[str, Any]) -> nn.Module:
    if [n["name"] for n in graph] == [""]:  # the model is one layer
        return _placeholder(layers[""])
    seq = nn.Sequential()
    for node in graph:
        if node["type"] == "layer":
            seq.add_module(node["name"], _placeholder(layers[node["name"]]))
        else:
            cls, args = GRAPH_TYPES[node["type"]]
            seq.add_module(node["name"], cls(**{a: _tuple(node[a]) for a in args}))
    return seq


def _csr_parts(
    state: dict[str, torch.Tensor], prefix: str, shape: Sequence[int], what: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pop and check the CSR tensors stored under `prefix` (16-bit columns widened)."""
    crow, col, values = (state.pop(prefix + k, None) for k in _SPARSE_KEYS[::-1])
    if crow is None or col is None or values is None:
        raise ValueError(f"{what} lacks values or indices")
    col, crow = (t.to(torch.int32) & 0xFFFF if t.dtype == torch.int16 else t for t in (col, crow))
    if col.dtype == torch.uint8:
        col = col.to(torch.int32)
    crow = crow.to(col.dtype)
    check_csr(crow, col, values, (shape[0], math.prod(shape[1:])), what)
    return crow, col, values


def _retie(out: nn.Module, aliases: dict[str, str]) -> None:
    """Make each alias key hold the very tensor of its stored key again (tied weights)."""
    for alias, key in aliases.items():
        owner, _, leaf = key.rpartition(".")
        tensor = getattr(out.get_submodule(owner), leaf)
        owner, _, leaf = alias.rpartition(".")
        setattr(out.get_submodule(owner), leaf, tensor)


def _install(
    out: nn.Module, name: str, lm: dict[str, Any], state: dict[str, torch.Tensor], path: Path
) -> nn.Module:
    """Put layer `name` into `out` as the file describes and return `out` (the new layer if
    `name` is "", the model itself); `state` keeps what load_state_dict should still load (a
    dense weight, or the new sparse layer's buffers)."""
    prefix = f"{name}." if name else ""
    shape = tuple(lm["shape"])
    if lm["storage"] == "sparse":
        crow, col, values = _csr_parts(state, prefix, shape, f"{path}: layer {name!r}")
        if lm["kernel"] == "dense":
            state[prefix + "weight"] = _dense(crow, col, values, shape)
            return out
    elif lm["kernel"] == "dense":
        return out
    else:
        crow, col, values = to_csr(state.pop(prefix + "weight"))
    bias = state.pop(prefix + "bias", None)
    new: nn.Module
    if lm["type"] == "Linear":
        new = SparseLinear(crow, col, values, shape, bias, lm["kernel"])
    else:
        conv = {k: tuple(lm["conv"][k]) for k in ("stride", "padding", "dilation")}
        new = SparseConv2d(crow, col, values, shape, bias, lm["kernel"], **conv)
    state.update({prefix + k: t for k, t in new.state_dict().items()})
    if not name:
        return new
    parent, _, leaf = name.rpartition(".")
    setattr(out.get_submodule(parent), leaf, new)
    return out


def load_export(path: str | Path, *, model: nn.Module | None = None) -> nn.Module:
    """Load a file written by `save_export` (never unpickles); returns a model in eval mode.

    Args:
        path: the safetensors file.
        model: an instance of the original architecture, needed only when the file has no
            layer graph (not a flat Sequential of `GRAPH_TYPES`); it is copied, not changed.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a corrupt or foreign file, or one that does not fit `model`.
    """
    path = Path(path)
    tensors, meta = _read(path)
    layers: dict[str, dict[str, Any]] = meta["layers"]
    try:
        if model is not None:
            out = remove(copy.deepcopy(model))
        elif meta["graph"] is not None:
            out = _from_graph(meta["graph"], layers)
        else:
            raise ValueError(
                f"{path}: the export has no layer graph (the model was not a flat Sequential of "
                f"supported layers); pass model=<an instance of the original architecture>"
            )
        state = dict(tensors)
        for name, lm in layers.items():
            out = _install(out, name, lm, state, path)
        for key, tm in meta["tensors"].items():
            shape = tuple(tm["shape"])
            parts = _csr_parts(state, f"{key}.", shape, f"{path}: tensor {key!r}")
            state[key] = _dense(*parts, shape)
        aliases: dict[str, str] = meta["aliases"]
        for alias, key in aliases.items():
            if key not in state:
                raise ValueError(f"{path}: {alias!r} is tied to {key!r}, which is not in the file")
            state[alias] = state[key]
        out.load_state_dict(state, strict=True, assign=True)
        _retie(out, aliases)
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: export does not fit the model ({e})") from None
    if meta["report"] is not None:
        attach_report(out, ExportReport.from_dict(meta["report"]))
    return out.eval()
