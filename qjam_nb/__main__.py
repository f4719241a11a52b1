"""``python -m qjam_nb demo [HOST ...]``: run the demo (on ``local:2`` by default)."""

import sys

USAGE = "usage: python -m qjam_nb demo [HOST ...]   (hosts default to local:2)"


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "demo":
        print(USAGE)
        return 2
    from .demo import main as demo

    return demo(argv[1:])


sys.exit(main(sys.argv[1:]))
