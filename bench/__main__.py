"""`python -m bench run|compare|plot ...`: the gateway benchmark; `--help` after each lists
its options (bench/README.md explains them)."""

from __future__ import annotations

import sys

USAGE = """usage: python -m bench run [--quick] [--scenarios a,b] [...]  (measure; JSON lines)
       python -m bench compare A.jsonl[:RUN] B.jsonl[:RUN]      (deltas between two runs)
       python -m bench plot [FILE.jsonl[:RUN]]                   (PNGs, RESULTS.md)"""


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "run":
        from bench import run as module
    elif command == "compare":
        from bench import compare as module  # type: ignore[no-redef]
    elif command == "plot":
        from bench import plot as module  # type: ignore[no-redef]
    else:
        print(USAGE, file=sys.stderr)
        return 2
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
