"""What `export` decided per layer, and why: `LayerExport` rows in an `ExportReport`, attached
to the exported model (`export_report`) and stored in export files (`deploy.export_file`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

_REPORT_ATTR = "_prunebound_export"


@dataclass(frozen=True)
class LayerExport:
    """What one Linear/Conv layer became: `kernel` is "dense" or a key of `kernels.KERNELS`.

    `timings_ms` holds each candidate's measured latency (median of interleaved repeats on the
    isolated layer; empty if not measured);
    `speedup` = dense time / chosen time, when both were measured (inside the model when the
    choice was re-checked there, see `reason`).
    """

    name: str
    type: str
    shape: tuple[int, ...]
    sparsity: float
    kernel: str
    reason: str
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    speedup: float | None = None


@dataclass(frozen=True)
class ExportReport:
    """Per-layer export decisions, with the settings they were measured under."""

    format: str
    batch_size: int
    threads: int
    layers: tuple[LayerExport, ...]

    @property
    def sparse_layers(self) -> tuple[str, ...]:
        """Names of the layers exported sparse."""
        return tuple(r.name for r in self.layers if r.kernel != "dense")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        d = asdict(self)
        d["layers"] = [{**r, "timings_ms": dict(r["timings_ms"])} for r in d["layers"]]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExportReport:
        """Inverse of `to_dict`."""
        layers = tuple(
            LayerExport(**{**r, "shape": tuple(r["shape"])}) for r in d.get("layers", ())
        )
        return cls(d["format"], int(d["batch_size"]), int(d["threads"]), layers)


def attached_report(model: nn.Module) -> ExportReport | None:
    """The `ExportReport` attached to a model by `export` or `load_export`, or None."""
    report = getattr(model, _REPORT_ATTR, None)
    return report if isinstance(report, ExportReport) else None


def export_report(model: nn.Module) -> ExportReport:
    """The `ExportReport` attached to a model by `export` or `load_export`."""
    report = attached_report(model)
    if report is None:
        raise ValueError("model has no export report (it was not made by pb.export/load_export)")
    return report


def attach_report(model: nn.Module, report: ExportReport) -> None:
    """Attach `report` so that `export_report(model)` returns it."""
    object.__setattr__(model, _REPORT_ATTR, report)
