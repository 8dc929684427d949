"""Entry point for Ray jobs: `ray job submit --working-dir . -- python launch.py CONFIG [key=value ...]`.

Runs `slm-dist run` in the job's driver. Nothing here names a cluster: inside a Ray job the
driver attaches to the job's own cluster (Ray sets RAY_ADDRESS for it), and `cluster.address`
in the config stays null. Options of the run (`--force`, `--json`) and the global ones
(`--quiet`, `--verbose`, `--log-json`) may appear anywhere. The exit code is 0 only when the
pruned checkpoint is complete and verified (or was already, for a finished run), 2 for bad input
(config, model folder, data), 1 for any other failure.
"""

import sys

from slm_dist.cli import main

GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose", "--log-json")


def launch(argv: list[str]) -> int:
    flags = [a for a in argv if a in GLOBAL_FLAGS]
    rest = [a for a in argv if a not in GLOBAL_FLAGS]
    return main([*flags, "run", *rest])


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
