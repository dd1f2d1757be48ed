"""prunebound: prune PyTorch networks, with bounds you can check.

The whole user API, by name::

    prune, Method, METHODS, register_method        # pruning (pruning.py, methods.py)
    masks, sparsity, remove, reset, is_pruned       # masks (masks.py)
    prunable_layers, original_weight
    save, load, snapshot, rewind                    # checkpoints (checkpoint.py)
    import_torch_prune, export_torch_prune
    data, models                                    # data sets and model builders (modules)
    train, evaluate, TrainConfig                    # training loops (pipeline.py)
    Schedule, run_schedule, Experiment, run         # schedules, whole runs (schedule, experiment)
    verify, VerifyReport, SearchConfig              # Monte Carlo checks of plans (verify.py)
    largest_fraction, LargestFraction
    export, export_report, save_export, load_export # sparse inference (export.py, export_io.py)
    ExportReport, LayerExport, SparseLinear, SparseConv2d
"""

from importlib.metadata import PackageNotFoundError, version

from prunebound import data, models, theory
from prunebound._masks import (
    LayerSparsity,
    Mask,
    SparsityReport,
    is_pruned,
    masks,
    original_weight,
    prunable_layers,
    remove,
    reset,
    sparsity,
)
from prunebound.check.verify import (
    LargestFraction,
    SearchConfig,
    VerifyReport,
    largest_fraction,
    verify,
)
from prunebound.checkpoint import (
    export_torch_prune,
    import_torch_prune,
    load,
    rewind,
    save,
    snapshot,
)
from prunebound.deploy.export import ExportReport, LayerExport, export, export_report
from prunebound.deploy.export_file import load_export, save_export
from prunebound.deploy.sparse import SparseConv2d, SparseLinear
from prunebound.methods import METHODS, Method, register_method
from prunebound.pruning import prune
from prunebound.training.config import DataSpec, Experiment, ModelSpec
from prunebound.training.experiment import RunResult, run
from prunebound.training.loop import TrainConfig, evaluate, train
from prunebound.training.runner import run_schedule
from prunebound.training.schedule import Schedule

try:
    __version__ = version("prunebound")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "METHODS",
    "DataSpec",
    "Experiment",
    "ExportReport",
    "LargestFraction",
    "LayerExport",
    "LayerSparsity",
    "Mask",
    "Method",
    "ModelSpec",
    "RunResult",
    "Schedule",
    "SearchConfig",
    "SparseConv2d",
    "SparseLinear",
    "SparsityReport",
    "TrainConfig",
    "VerifyReport",
    "__version__",
    "data",
    "evaluate",
    "export",
    "export_report",
    "export_torch_prune",
    "import_torch_prune",
    "is_pruned",
    "largest_fraction",
    "load",
    "load_export",
    "masks",
    "models",
    "original_weight",
    "prunable_layers",
    "prune",
    "register_method",
    "remove",
    "reset",
    "rewind",
    "run",
    "run_schedule",
    "save",
    "save_export",
    "snapshot",
    "sparsity",
    "theory",
    "train",
    "verify",
]
