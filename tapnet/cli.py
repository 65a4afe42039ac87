"""The `tapnet` command line.

Each subcommand lives in the module that does its job; that module exposes
`register(subparsers)`, which adds its parser and sets `func` to a callable
taking the parsed arguments and returning the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands, with the commands each one adds, in the
# order `tapnet --help` lists them. A module that is missing (not built yet)
# is skipped.
SUBCOMMAND_MODULES = {
    "tapnet.control": ("start", "stop", "ps", "inspect", "stats", "exec", "scale", "conntrack", "lb"),
    "tapnet.replay": ("replay",),
    "tapnet.views": ("trace", "capture", "fdb", "neigh", "diagram"),
}


def _modules_for(argv: list[str]) -> list[str]:
    """Only the module that owns the requested command, so `tapnet ps` does not import numba."""
    words = [a for a in argv if not a.startswith("-")]
    if words:
        for module, commands in SUBCOMMAND_MODULES.items():
            if words[0] in commands:
                return [module]
    return list(SUBCOMMAND_MODULES)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapnet",
        description="Docker's container networking as a packet-level userspace router.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _modules_for(sys.argv[1:] if argv is None else argv):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
