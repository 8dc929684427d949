"""Probe (issue 19): ideas for improving `refit`, tested in memory before building any into the stages.

    python bench/probe_after_cut.py [--samples 64] [--remove 13-18] [--after 0 1 3]
    python bench/probe_after_cut.py --remove 4-5,12-18,26 --after 0 --independent

An idea test, not a method of slm-dist: the whole SmolLM2-135M in memory, plain transformers. For each
removed block it refits the MLP output projection of the layer before the block to reproduce the dense
model's residual stream after the block (slm-dist's `refit`, simplified: one held-out split instead of
cross-validation, rows weighted by 1 / ||target|| as `merge.correction_weight: relative` does).

- ``--after N``: then refits each of the next N layers' output projection the same way, one after another
  on the already-corrected model, each to the dense model's residual stream at its own depth.
- Error feedback: by default each block is fitted on the pruned model as corrected so far (the inputs it
  will see); ``--independent`` adds the fit on the dense model's inputs, as slm-dist's `refit` does.
- ``--alphas``: the host layer first takes SLM's scaled merge of its window, then the refit.
- ``--joint``: the attention output projection refitted together with the MLP's, then the MLP's again.
- ``--grad-weight``: rows weighted by the norm of the dense loss gradient at the target depth.

What each gave is in bench/RESULTS.md (issue 19, eleventh session): none helped.

Perplexity on the first 8 windows of 512 tokens of WikiText-2 test and PTB test; calibration on consecutive
256-token pieces of the demo's Wikipedia text (the last 16 held out to pick the ridge).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from slm_dist.assets import default_cache_dir, prepare_demo_assets
from slm_dist.evaluation import read_ppl_text

log = logging.getLogger("probe_after_cut")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HELD_OUT, SEQ, BATCH = 16, 256, 8
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # times the mean diagonal of the normal equations


def windows(ids: list[int], n: int, length: int) -> torch.Tensor:
    return torch.tensor(ids[: n * length]).view(n, length)


@torch.no_grad()
def perplexity(model, w: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for k in range(0, len(w), 2):
        x = w[k:k + 2]
        logits = model(x).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


class Probe:
    def __init__(self, model_dir: Path, calibration: torch.Tensor, remove: list[int], feedback: bool = True,
                 held_out: int = HELD_OUT):
        self.model_dir, self.calibration, self.feedback = model_dir, calibration, feedback
        self.held_out = held_out  # the last calibration pieces, kept apart to choose the ridge
        dense = self.load()
        self.num_layers = dense.config.num_hidden_layers
        self.kept = [i for i in range(self.num_layers) if i not in remove]
        with torch.no_grad():  # the dense residual stream before every layer, per calibration batch
            self.dense_states = [dense(calibration[k:k + BATCH], output_hidden_states=True).hidden_states[:-1]
                                 for k in range(0, len(calibration), BATCH)]
        self.dense = dense
        self.grad_norms = None  # per batch: [depth, batch, position] norms of d(NLL)/d(hidden state), on demand
        self.grad_weight = False

    def dense_gradients(self, pieces: int | None = None):
        """Per calibration batch (of the first ``pieces``, or all): the dense model's hidden state before every
        layer, each with ``.grad`` = d NLL / d h (one backward per batch)."""
        for k in range(0, len(self.calibration) if pieces is None else pieces, BATCH):
            x = self.calibration[k:k + BATCH]
            out = self.dense(x, output_hidden_states=True)
            states = out.hidden_states[:-1]
            for h in states:
                h.retain_grad()
            logits = out.logits[:, :-1].float()
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").backward()
            yield states
            self.dense.zero_grad(set_to_none=True)

    def loss_gradients(self) -> None:
        """||d NLL / d h|| of every calibration token at every depth of the dense model."""
        self.grad_norms = [torch.stack([h.grad.norm(dim=-1) for h in states]).detach()
                           for states in self.dense_gradients()]

    def load(self):
        return AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32,
                                                    trust_remote_code=False).eval()

    def pruned(self, alpha: float = 0.0, blocks: list[list[int]] = ()):
        """The model without the removed layers; with ``alpha``, each block's host layer (the one before
        it) first takes SLM's scaled merge of the window: theta_host + alpha * sum_k (theta_k - theta_host)
        over the block's layers, projections only (norms stay the host's)."""
        model = self.load()
        for block in blocks if alpha else ():
            host = model.model.layers[block[0] - 1]
            members = [dict(model.model.layers[i].named_parameters()) for i in block]
            with torch.no_grad():
                for name, p in host.named_parameters():
                    if "norm" not in name:
                        p.add_(alpha * sum(m[name] - p for m in members))
        model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in self.kept])
        model.config.num_hidden_layers = len(self.kept)
        for j, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = j
        return model

    def target_depth(self, j: int) -> int:
        """The dense hidden state pruned layer j should output: the one before the next kept layer."""
        return self.kept[j + 1] if j + 1 < len(self.kept) else self.num_layers

    @torch.no_grad()
    def rows(self, model, j: int, joint: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer j's MLP intermediate activations and its target residual, rows weighted by 1 / ||target||.
        With ``feedback`` they come from the pruned model as corrected so far; without, from the dense
        model (each window fitted on the dense model's inputs, as slm-dist's `refit` does)."""
        if not self.feedback:
            model, j_run = self.dense, self.kept[j]
        else:
            j_run = j
        layer, seen = model.model.layers[j_run], {}
        hooks = [layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.update(mid=a[0])),
                 layer.input_layernorm.register_forward_hook(lambda m, a, out: seen.update(inp=a[0])),
                 layer.self_attn.o_proj.register_forward_hook(lambda m, a, out: seen.update(ctx=a[0]))]
        layers, features, targets = model.model.layers, [], []
        try:
            model.model.layers = layers[:j_run + 1]  # run only as deep as layer j
            for b, k in enumerate(range(0, len(self.calibration), BATCH)):
                model.model(self.calibration[k:k + BATCH])
                mid = seen["mid"]
                x = layer.post_attention_layernorm(mid)
                u = F.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)
                target = self.dense_states[b][self.target_depth(j)]
                if self.grad_weight:  # first order: the NLL moves by g . error, so weight each row by ||g||
                    weight = self.grad_norms[b][self.target_depth(j)].unsqueeze(-1)
                else:
                    weight = 1.0 / target.norm(dim=-1, keepdim=True).clamp_min(1e-6)
                if joint:  # the attention's output projection too: the layer's whole change, from its input
                    u, mid = torch.cat([seen["ctx"], u], dim=-1), seen["inp"]
                features.append((u * weight).reshape(-1, u.shape[-1]))
                targets.append(((target - mid) * weight).reshape(-1, mid.shape[-1]))
        finally:
            model.model.layers = layers
            for hook in hooks:
                hook.remove()
        return torch.cat(features).double(), torch.cat(targets).double()

    @torch.no_grad()
    def refit(self, model, j: int, joint: bool = False) -> None:
        """Layer j's MLP output projection; with ``joint``, its attention output projection with it, fitted
        together on [attention context, MLP intermediate] with the MLP's input taken as it was."""
        u, r = self.rows(model, j, joint)
        split = len(u) - self.held_out * self.calibration.shape[1]
        layer = model.model.layers[j]
        original = layer.mlp.down_proj.weight.double().T  # [intermediate, hidden]
        if joint:
            original = torch.cat([layer.self_attn.o_proj.weight.double().T, original])
        gram, cross = u[:split].T @ u[:split], u[:split].T @ r[:split]
        # Each feature's own scale (the context and the intermediate differ by orders of magnitude).
        scale = torch.diag(gram.diagonal()) if joint else gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)

        def held_out_error(x):
            return float(((u[split:] @ x - r[split:]) ** 2).sum())

        plain = best_error = held_out_error(original)
        best, best_ridge = original, None
        for ridge in RIDGES:
            x = torch.linalg.solve(gram + ridge * scale, cross + ridge * scale @ original)
            if (error := held_out_error(x)) < best_error:
                best, best_error, best_ridge = x, error, ridge
        log.info("layer %d (dense %d): held-out error %.4g -> %.4g (ridge %s)", j, self.kept[j], plain,
                 best_error, best_ridge)
        if joint:
            width = layer.self_attn.o_proj.weight.shape[1]
            layer.self_attn.o_proj.weight.copy_(best[:width].T.float())
            best = best[width:]
        layer.mlp.down_proj.weight.copy_(best.T.float())


def removed_layers(spec: str) -> list[list[int]]:
    """"4-5,12-18,26" -> [[4, 5], [12, ..., 18], [26]]: the removed blocks, dense indices."""
    blocks = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        blocks.append(list(range(int(first), int(last or first) + 1)))
    return blocks


def setup(samples: int, blocks: list[list[int]], seq: int = SEQ
          ) -> tuple[Probe, dict[str, torch.Tensor], dict[str, float]]:
    """The probe on ``samples`` calibration pieces of ``seq`` tokens (+ the held-out ones, as many tokens as
    16 of 256) without ``blocks``, the evaluation windows, and the dense model's perplexity on them."""
    torch.manual_seed(0)
    assets = prepare_demo_assets(default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir, trust_remote_code=False)

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    calibration_text = Path(assets.calibration_text).read_text(encoding="utf-8")[:3_000_000]
    held_out = max(1, HELD_OUT * SEQ // seq)
    calibration = windows(tokens(calibration_text), samples + held_out, seq)
    # The texts as `slm-dist eval` joins them; the first 8 windows of 512 tokens (the eval spreads its windows).
    evals = {"wikitext-2": windows(tokens(read_ppl_text(DATA / "wikitext-2-raw" / "wiki.test.hf_rows.jsonl")), 8, 512),
             "ptb": windows(tokens(read_ppl_text(DATA / "ptb" / "ptb.test.txt")), 8, 512)}
    probe = Probe(assets.model_dir, calibration, [i for block in blocks for i in block], held_out=held_out)
    dense = {name: perplexity(probe.dense, w) for name, w in evals.items()}
    log.info("dense: %s", dense)
    return probe, evals, dense


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="calibration pieces of 256 tokens for the fit")
    parser.add_argument("--remove", default="13-18",
                        help="removed blocks, dense indices: 13-18, or 4-5,12-18,26 for several")
    parser.add_argument("--after", type=int, nargs="*", default=[0, 1, 3],
                        help="how many layers after each block to refit as well (0: `refit` alone)")
    parser.add_argument("--alphas", type=float, nargs="*", default=[],
                        help="also refit on SLM's scaled merge of each window with these alphas")
    parser.add_argument("--grad-weight", action="store_true",
                        help="also weight each row by the norm of the dense NLL's gradient at the target depth")
    parser.add_argument("--joint", action="store_true",
                        help="also refit the attention output projection with the MLP's, then the MLP's again")
    parser.add_argument("--independent", action="store_true",
                        help="also fit every block on the dense model's inputs (no error feedback)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    blocks = removed_layers(args.remove)
    probe, evals, dense = setup(args.samples, blocks)
    cuts = [probe.kept.index(block[0] - 1) for block in blocks]
    variants = [("drop", None, True, 0.0)] + [(f"refit + {n} after", n, True, 0.0) for n in args.after]
    if args.independent:
        variants.append(("refit, dense inputs", 0, False, 0.0))
    variants += [(f"scaled {a} + refit", 0, True, a) for a in args.alphas]
    if args.grad_weight:
        variants.append(("refit, rows by loss gradient", "grad", True, 0.0))
    if args.joint:
        variants.append(("joint o_proj + down_proj, then down_proj", "joint", True, 0.0))
    for label, after, feedback, alpha in variants:
        start, model = time.time(), probe.pruned(alpha, blocks)
        probe.feedback = feedback
        probe.grad_weight = after == "grad"
        if after == "grad":
            if probe.grad_norms is None:
                probe.loss_gradients()
            after = 0
        if after == "joint":
            for cut in cuts:
                probe.refit(model, cut, joint=True)
                probe.refit(model, cut)  # the MLP's input moved with the new attention output: refit it there
            after = None
        probe.feedback = feedback
        if after is not None:
            for cut, stop in zip(cuts, cuts[1:] + [len(probe.kept) - 1]):  # never past the next block's cut
                for j in range(cut, min(cut + after + 1, stop, len(probe.kept) - 1)):
                    probe.refit(model, j)
        scores = {name: perplexity(model, w) for name, w in evals.items()}
        log.info("%-20s %s (%.0f s)", label, "  ".join(f"{n} {v:.2f} ({v / dense[n]:.2f}x dense)"
                                                       for n, v in scores.items()), time.time() - start)


if __name__ == "__main__":
    main()
