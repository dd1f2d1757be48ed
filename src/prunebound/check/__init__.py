"""The Monte Carlo wing: checks of theory plans on sampled networks.

Holds `batch` (N sampled networks held as batched weights, pruned together, and the worst-gap
search over the input ball) and `verify` (`verify`, `largest_fraction`). It may import the core
and `prunebound.theory` (the plans it checks), never `training`, `deploy`, `commands` or the
package face. `theory/sampled.py` imports `batch` for now; it moves here with the theory
re-housing.
"""
