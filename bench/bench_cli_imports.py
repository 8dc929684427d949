"""Wall time of `slm-dist verify` and `slm-dist plan --dry-run` in a fresh interpreter (issue 18),
against the same commands with torch imported first: what these two paid before (the checkpoint
writer's dtype table and the planner imported torch; neither loaded transformers or matplotlib).
Both measured in this run, interleaved.

    python bench/bench_cli_imports.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = "import sys\n{pre}from slm_dist.cli import main\nsys.exit(main(sys.argv[1:]))\n"
HEAVY = "import torch\n"


def seconds(code: str, args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from slm_dist.checkpoint.writer import FileRecord, hash_file, write_manifest
    from slm_dist.testing import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "model")
        write_manifest(model, [FileRecord(p.name, hash_file(p), p.stat().st_size) for p in sorted(model.iterdir())])
        commands = {"verify": ["-q", "verify", str(model)],
                    "plan --dry-run": ["-q", "plan", "--dry-run", "--json", str(REPO / "configs" / "tiny.yaml"),
                                       f"model.path={model}", f"run.dir={tmp}/run"]}
        rows = {}
        for name, argv in commands.items():
            now, before = [], []
            for _ in range(args.repeats):   # interleaved: load on the machine hits both alike
                now.append(seconds(RUN.format(pre=""), argv))
                before.append(seconds(RUN.format(pre=HEAVY), argv))
            rows[name] = {"now_s": statistics.median(now), "with_heavy_imports_s": statistics.median(before),
                          "now_stderr": statistics.stdev(now) / len(now) ** 0.5,
                          "before_stderr": statistics.stdev(before) / len(before) ** 0.5}
            rows[name]["speedup"] = rows[name]["with_heavy_imports_s"] / rows[name]["now_s"]
    print("| command | now: median s (± s.e. of the mean) | with torch imported first, as before | ratio of medians |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| `{name}` | {r['now_s']:.2f} ± {r['now_stderr']:.2f} | {r['with_heavy_imports_s']:.2f} ± "
              f"{r['before_stderr']:.2f} | {r['speedup']:.1f}x |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
