"""The deployment wing: pruned models made fast and small for inference.

Holds `export` (an in-memory copy with sparse layers where a measured kernel is faster),
`export_file` (`save_export` / `load_export`: only nonzeros and indices on disk), `summary`
(the export line of a run report), `sparse` (`SparseLinear`, `SparseConv2d` and their CSR
kernels), `shrink` (a physically smaller model; `shrink_file` its files, `shrink_report` its
figures), `expand` (a shrunk model back in its original shapes, for certify) and
`_numba_kernels` (the optional numba kernels). It may import the core only
(`prunebound.<module>` at the top level), never `training`, `check`, `theory`, `commands` or
the package face.
"""
