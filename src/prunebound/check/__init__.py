"""The Monte Carlo wing: checks of theory plans on sampled networks.

Holds `batch` (N sampled networks held as batched weights, pruned together, and the worst-gap
search over the input ball), `verify` (`verify`, `largest_fraction`: does a plan hold on
sampled networks?) and `sampled` (`sampled_plan`: a plan whose guarantee is a Clopper-Pearson
test over sampled networks' certificates). It may import the core and `prunebound.theory` (the
plans it checks and the certificates it samples), never `training`, `deploy`, `commands` or the
package face.
"""
