"""Command-line entry point. Parses, builds, runs, closes; the logic lives in components.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``main(args) -> int``;
modules are imported lazily so ``swarmnode --version`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from swarmnode import __version__

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("swarmnode.daemon", "run a swarm node (the daemon)"),
    "local-swarm": ("swarmnode.localswarm", "run N nodes on 127.0.0.1 and summarise how they learn"),
    "train": ("swarmnode.train", "train a single node with no peers"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarmnode", description="Decentralized RL post-training over libp2p."
    )
    parser.add_argument("--version", action="version", version=f"swarmnode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported (torch, libp2p are slow to import).
        if name in argv:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    result: int = args._main(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
