"""`python -m bench run [options]`: the gateway benchmark (bench/run.py); `--help` lists them."""

from __future__ import annotations

import sys

from bench import run


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "run":
        print("usage: python -m bench run [--quick] [--scenarios a,b] [...]", file=sys.stderr)
        return 2
    return run.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
