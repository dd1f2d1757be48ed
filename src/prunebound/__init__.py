"""prunebound: prune PyTorch networks, with bounds you can check.

The whole user API, by name::

    prune, Method, METHODS, register_method        # pruning (pruning.py, methods.py)
    masks, sparsity, remove, reset, is_pruned       # masks (masks.py)
    prunable_layers, original_weight
    save, load, snapshot, rewind                    # checkpoints (checkpoint.py)
    import_torch_prune, export_torch_prune
    data, models                                    # data sets and model builders (modules)
"""

from importlib.metadata import PackageNotFoundError, version

from prunebound import data, models, theory
from prunebound.checkpoint import (
    export_torch_prune,
    import_torch_prune,
    load,
    rewind,
    save,
    snapshot,
)
from prunebound.masks import (
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
from prunebound.methods import METHODS, Method, register_method
from prunebound.pruning import prune

try:
    __version__ = version("prunebound")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "METHODS",
    "LayerSparsity",
    "Mask",
    "Method",
    "SparsityReport",
    "__version__",
    "data",
    "export_torch_prune",
    "import_torch_prune",
    "is_pruned",
    "load",
    "masks",
    "models",
    "original_weight",
    "prunable_layers",
    "prune",
    "register_method",
    "remove",
    "reset",
    "rewind",
    "save",
    "snapshot",
    "sparsity",
    "theory",
]
