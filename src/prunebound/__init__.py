"""prunebound: prune PyTorch networks, with bounds you can check.

Every exported name, by wing (defining module in brackets; the design: docs/design.md)::

    core      prune                                   [pruning]
              refit                                   [refitting]
              Method, METHODS, register_method, ScoreContext   [methods]
              masks, remove, reset, is_pruned, prunable_layers, original_weight, Mask   [_masks]
              sparsity, LayerSparsity, SparsityReport  [sparsity_stats]
              save, load, snapshot, rewind,
              import_torch_prune, export_torch_prune   [checkpoint]
              data, models                             (modules: data sets, model builders)
    training  train, evaluate, TrainConfig             [training.loop]
              Schedule, run_schedule                   [training.schedule, training.runner]
              Experiment, ModelSpec, DataSpec          [training.config]
              run, RunResult, run_distributed          [training.experiment, training.launch]
    deploy    export, export_report, ExportReport, LayerExport   [deploy.export]
              save_export, load_export                 [deploy.export_file]
              SparseLinear, SparseConv2d               [deploy.sparse]
              shrink                                   [deploy.shrink]
              expand                                   [deploy.expand]
              save_shrunk, load_shrunk                 [deploy.shrink_file]
    check     verify, VerifyReport, largest_fraction, LargestFraction   [check.verify]
              sampled_plan, SampledPlan                [check.sampled]
              SearchConfig                             [check.batch]
    certified compress, CompressResult                  [certified.search]
    theory    theory                                   (module: plans, bounds, certificates)
              __version__
"""

from importlib.metadata import PackageNotFoundError, version

from prunebound import data, models, theory
from prunebound._masks import (
    Mask,
    is_pruned,
    masks,
    original_weight,
    prunable_layers,
    remove,
    reset,
)
from prunebound.certified.search import CompressResult, compress
from prunebound.check.batch import SearchConfig
from prunebound.check.sampled import SampledPlan, sampled_plan
from prunebound.check.verify import LargestFraction, VerifyReport, largest_fraction, verify
from prunebound.checkpoint import (
    export_torch_prune,
    import_torch_prune,
    load,
    rewind,
    save,
    snapshot,
)
from prunebound.deploy.expand import expand
from prunebound.deploy.export import ExportReport, LayerExport, export, export_report
from prunebound.deploy.export_file import load_export, save_export
from prunebound.deploy.shrink import shrink
from prunebound.deploy.shrink_file import load_shrunk, save_shrunk
from prunebound.deploy.sparse import SparseConv2d, SparseLinear
from prunebound.methods import METHODS, Method, ScoreContext, register_method
from prunebound.pruning import prune
from prunebound.refitting import refit
from prunebound.sparsity_stats import LayerSparsity, SparsityReport, sparsity
from prunebound.training.config import DataSpec, Experiment, ModelSpec
from prunebound.training.experiment import RunResult, run
from prunebound.training.launch import run_distributed
from prunebound.training.loop import TrainConfig, evaluate, train
from prunebound.training.runner import run_schedule
from prunebound.training.schedule import Schedule

try:
    __version__ = version("prunebound")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "METHODS",
    "CompressResult",
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
    "SampledPlan",
    "Schedule",
    "ScoreContext",
    "SearchConfig",
    "SparseConv2d",
    "SparseLinear",
    "SparsityReport",
    "TrainConfig",
    "VerifyReport",
    "__version__",
    "compress",
    "data",
    "evaluate",
    "expand",
    "export",
    "export_report",
    "export_torch_prune",
    "import_torch_prune",
    "is_pruned",
    "largest_fraction",
    "load",
    "load_export",
    "load_shrunk",
    "masks",
    "models",
    "original_weight",
    "prunable_layers",
    "prune",
    "refit",
    "register_method",
    "remove",
    "reset",
    "rewind",
    "run",
    "run_distributed",
    "run_schedule",
    "sampled_plan",
    "save",
    "save_export",
    "save_shrunk",
    "shrink",
    "snapshot",
    "sparsity",
    "theory",
    "train",
    "verify",
]
