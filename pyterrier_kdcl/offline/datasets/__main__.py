"""``python -m pyterrier_kdcl.offline.datasets build [NAME …] [--force]``: build the collections ahead of time."""

from __future__ import annotations

import argparse
import sys

from .builder import COLLECTIONS, build
from .debian import SourcesUnavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyterrier_kdcl.offline.datasets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the collections (reusing those already built)")
    b.add_argument("names", nargs="*", choices=[[], *COLLECTIONS], metavar="NAME",
                   help=f"collections to build (default: all of {', '.join(COLLECTIONS)})")
    b.add_argument("--force", action="store_true", help="rebuild even when already built")
    args = parser.parse_args(argv)
    try:
        build(args.names or None, force=args.force)
    except SourcesUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
