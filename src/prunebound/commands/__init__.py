"""The command line's commands, grouped by what they work on (accelerate's `commands/` shape).

`train` (demo, run), `files` (prune, export, report: checkpoints and results on disk),
`compress` (certified compression) and
`theory` (plan, certify, verify); `_args` holds the argparse value types and the shared
arguments. Each command is an `add_<cmd>_parser(subparsers)` / `run_<cmd>(args) -> int` pair,
and `prunebound.cli` assembles them. Commands parse, call the library and print what `report`
formats; they are the only code besides the CLI that prints. They may import any module.
"""
