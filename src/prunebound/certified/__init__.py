"""The certified-compression wing: the sparsest pruning of a trained model whose behaviour
provably stays within a budget of the original, certified on held-out data.

Holds `search` (`compress`, `CompressResult`): prune with any criterion of the core (magnitude,
the data-aware ones), optionally retrain (or distil towards the original) on the search split,
pick the sparsity on a validation part of that split, and certify the pick once on a certify
split no choice has seen (`theory.datacert.data_certificate`, Bonferroni across the attempts).
It may import the core, `training` (retraining) and `theory` (the certificate), never `deploy`,
`check`, `commands` or the package face.
"""
