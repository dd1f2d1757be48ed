"""The training wing: train → prune → retrain runs.

Holds the training loop (`loop`: `train`, `evaluate`, `TrainConfig`), pruning schedules
(`schedule`: one-shot, iterative, lottery ticket), whole experiments from TOML configs
(`config`, `experiment`: `run`), run checkpoints for `--resume` (`resume`), and data-parallel
retraining (`distributed`: in-rank collectives; `launch`: local processes and
`run_distributed`). It may import the core (`prunebound.<module>` at the top level) and the
deployment wing (`prunebound.deploy`, for the export line of a run report), never `check`,
`theory`, `commands` or the package face.
"""
