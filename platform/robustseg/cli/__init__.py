"""The `robustseg` command: one module per subcommand group, each with ``register(subparsers)``.

Groups: `data` (``prepare``, ``inspect``, ``sources``, ``config``), `train` (``train``,
``tune``, ``report``), `predict` (``predict``, ``evaluate``), `ensemble` (``ensemble``,
``registry``), `serve`, `robustness`, `analysis` (``svcca``), `pseudo` (``pseudo-labels``),
`demo`, `cluster` (a local multi-node cluster). Shared helpers are in `common`. Errors the user can fix print one line naming the
file or URI and exit with status 2; no traceback.

Layering: only this package imports ``trainables`` (Ray entry points) and ``deploy``; the
library never imports it (tests/test_layers.py).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from robustseg.cli import analysis, cluster, data, demo, ensemble, predict, pseudo, robustness, serve, train
from robustseg.cli.common import parse_source  # noqa: F401  (public: `robustseg.cli.parse_source`)
from robustseg.errors import RobustsegError

#: In `robustseg --help` order.
GROUPS = (data, train, predict, ensemble, serve, robustness, analysis, pseudo, demo, cluster)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the `robustseg` command: every group registers its subcommands."""
    p = argparse.ArgumentParser(
        prog="robustseg",
        description="Robust medical image segmentation from small data: prepare, train, search, serve.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except RobustsegError as e:
        print(f"robustseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robustseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
