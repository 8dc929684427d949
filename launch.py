"""Entry point for `ray job submit --working-dir . -- python launch.py CONFIG [key=value ...]`."""

import sys

from slm_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
