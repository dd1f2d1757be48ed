"""Command line: `prunebound demo | run | prune | export | report | plan | certify | verify`.

The commands live in `prunebound.commands` (one `add_<cmd>_parser` / `run_<cmd>` pair each); this
module assembles the parser and runs one. Exit codes: 0 success, 2 usage error (argparse), 1
runtime failure with a one-line reason on stderr, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from prunebound import __version__
from prunebound.commands import compress, files, theory, train
from prunebound.commands._args import UsageError, pos_int

Handler = Callable[[argparse.Namespace], int]

# Value types stricter than some commands declare (commands/theory.py, being re-housed, gives
# these plain float/ints, so a bad value failed in the library: exit 1). Applied where an
# option still has the loose type, so that a bad value is a usage error (exit 2) everywhere.
COMMANDS: list[Callable[[Any], None]] = [
    train.add_demo_parser,
    train.add_run_parser,
    files.add_prune_parser,
    files.add_export_parser,
    files.add_report_parser,
    theory.add_plan_parser,
    theory.add_certify_parser,
    theory.add_verify_parser,
    theory.add_data_certificate_parser,
    compress.add_compress_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunebound", description="Prune PyTorch networks, with bounds you can check."
    )
    parser.add_argument("--version", action="version", version=f"prunebound {__version__}")
    parser.add_argument(
        "--threads", type=pos_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():  # for UsageError: the command's own usage line
        p.set_defaults(command_parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (tests call `main([...])`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    handler: Handler = args.handler
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return handler(args)
    except UsageError as e:  # argparse-style: usage, "prog cmd: error: ...", exit 2
        command_parser: argparse.ArgumentParser = args.command_parser
        command_parser.error(str(e))
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"prunebound {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"prunebound {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
