"""Command line: ``entropy-gpu demo | bench | grad-report | sia | sia-bench``.

``demo`` is the Quickstart's main job on built-in defaults: token statistics on a
batch, checked against float64, a small benchmark table on whatever device
is present, and a short SIA run on the bundled SmolLM2.

Each folder registers its own subcommands: its ``cli.py`` has ``register(subparsers)``
(``demo``, which spans folders, lives here in ``demo.py``). ``build_parser`` imports those
modules when it runs, so importing this package imports none of them.

Every command checks its arguments before it loads a model or starts work; a user
error is one line on stderr and exit code 2 (``--debug`` shows the traceback). Nothing
contacts a model hub unless ``--allow-download`` (or ``ENTROPY_GPU_ALLOW_DOWNLOAD=1``)
is given.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from .support import Parser, UsageError, downloads_allowed, go_offline

DESCRIPTION = ("Fused token statistics (entropy, log-prob, gradient norms) over huge vocabularies: "
               "a demo, benchmarks, SIA curves and the parameter-gradient report. "
               "Runs offline unless --allow-download is given.")
# The modules that register subcommands (``register(subparsers)``), in the order of the help.
COMMAND_MODULES = (
    "entropy_gpu.cli.demo",             # demo
    "entropy_gpu.bench.cli",            # bench
    "entropy_gpu.analysis.cli",         # grad-report
    "entropy_gpu.analysis.sia.cli",     # sia, sia-bench
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="entropy-gpu", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"entropy-gpu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (2 for a user error, printed as one line)."""
    args = build_parser().parse_args(argv)
    if argv is not None:
        args.argv = argv
    if not downloads_allowed(args.allow_download):
        go_offline()
    args.allow_download = downloads_allowed(args.allow_download)
    try:
        return args.func(args)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"entropy-gpu {args.command}: error: {exc}", file=sys.stderr)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"entropy-gpu {args.command}: error: {first} (--debug shows the traceback)", file=sys.stderr)
    except KeyboardInterrupt:
        # On a line of its own: a progress bar may hold the current one. ``resumable``: the
        # command keeps finished records (its register sets it); a --fidelity report keeps none.
        resumable = getattr(args, "resumable", False) and not getattr(args, "fidelity", False)
        hint = "; rerun the same command to resume" if resumable else ""
        print(f"\nentropy-gpu {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 2


__all__ = ["COMMAND_MODULES", "DESCRIPTION", "build_parser", "main"]
