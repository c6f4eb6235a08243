"""The ``pixelwise`` command's entry point: :func:`pixelwise.cli.main`, whose import (argparse,
PyYAML, the configuration layer: about 0.3 s) a Ctrl-C may interrupt, as a user who spots a typo
right after Enter does; that ends in the one line every other interruption gives, not a traceback."""

from __future__ import annotations

import sys


def main() -> int:
    try:
        from pixelwise.cli import main as run  # start-up time: what a Ctrl-C may interrupt is here
    except KeyboardInterrupt:
        print("pixelwise: interrupted", file=sys.stderr)
        return 130
    return run()
