"""Stage workers chained over a multi-shard tiny checkpoint reproduce the full HF model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from slm_dist.backends.local import LocalBackend
from slm_dist.core import similarity
from slm_dist.testing import layer_split_across_shards, make_tiny_model
from slm_dist.workers.stage_worker import StageSpec, StageWorker, StatsSpec

# float32 on CPU, same kernels, same order of operations: outputs agree to rounding.
ATOL = 1e-5


def hf_layer_outputs(model_dir, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[embedding output, output of each decoder layer] and the logits, from the full HF model."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
    outs: list[torch.Tensor] = []
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, i, o: outs.append(o))]
    for layer in model.model.layers:
        hooks.append(layer.register_forward_hook(lambda m, i, o: outs.append(o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        logits = model(ids).logits
    for h in hooks:
        h.remove()
    return outs, logits


def slices(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    bounds = [round(k * num_layers / num_stages) for k in range(num_stages + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def test_fixture_has_layers_straddling_shards(tiny_model):
    assert layer_split_across_shards(tiny_model), "the fixture must split a layer across two shard files"


@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_chained_stages_equal_full_model(tiny_model, num_stages):
    ids = torch.randint(3, 60, (3, 20), generator=torch.Generator().manual_seed(1))
    ref, logits = hf_layer_outputs(tiny_model, ids)
    workers = [StageWorker(StageSpec(str(tiny_model), a, b, 6)) for a, b in slices(6, num_stages)]
    x, got = ids, []
    for w in workers:
        h = w._inputs(x)
        if w.spec.is_first:
            got.append(h)
        ctx = w.context(h)
        for layer_id, layer in zip(w.layer_ids, w.layers):
            h = w.run_layer(layer, layer_id, h, ctx)
            got.append(h)
        x = w.forward(x)
        torch.testing.assert_close(x, got[-1], atol=0, rtol=0)
    assert len(got) == len(ref) == 7
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=f"row {i}")
    x = ids
    for w in workers[:-1]:
        x = w.forward(x)
    logp = workers[-1].token_logprobs(x, ids)
    ref_logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp, ref_logp, atol=ATOL, rtol=0)
    # From a start position: the same values there (the head runs on fewer positions), NaN before.
    start = ids.shape[1] // 2
    tail = workers[-1].token_logprobs(x, ids, start)
    assert tail.shape == logp.shape and bool(tail[:, :start].isnan().all())
    torch.testing.assert_close(tail[:, start:], logp[:, start:], atol=1e-6, rtol=0)
    # greedy (lm-eval's is_greedy): a second channel, 1 exactly where the next token is the HF argmax.
    both = workers[-1].token_logprobs(x, ids, start, greedy=True)
    assert both.shape == (*logp.shape, 2) and bool(both[:, :start].isnan().all())
    torch.testing.assert_close(both[:, start:, 0], logp[:, start:], atol=1e-6, rtol=0)
    ids = ids.clone()
    ids[0, start + 1] = int(logits[0, start].argmax())     # plant one hit, so both values are checked
    x = ids
    for w in workers[:-1]:
        x = w.forward(x)
    both = workers[-1].token_logprobs(x, ids, start, greedy=True)
    hits = (hf_layer_outputs(tiny_model, ids)[1][:, :-1].argmax(-1) == ids[:, 1:]).float()
    assert 0 < hits[:, start:].sum() < hits[:, start:].numel()
    assert torch.equal(both[:, start:, 1], hits[:, start:])


def test_stage_reads_only_its_own_tensors(tiny_model):
    w = StageWorker(StageSpec(str(tiny_model), 2, 4, 6))
    layers = {int(k.split(".")[2]) for k in w.loaded_keys() if k.startswith("model.layers.")}
    assert layers == {2, 3}
    assert not any(k.startswith(("model.embed_tokens", "model.norm", "lm_head")) for k in w.loaded_keys())
    held = {n for n, _ in w.layers.named_parameters()}
    assert len(held) == 2 * 9  # two layers, nine tensors each (7 projections, 2 norms)
    assert w.embed is None and w.norm is None and w.lm_head is None
    assert all(p.device.type == "cpu" for p in w.layers.parameters())  # nothing left on meta


def test_causal_attention_is_set(tiny_model):
    """A later token must not change an earlier token's output (a bare layer would attend both ways)."""
    w = StageWorker(StageSpec(str(tiny_model), 0, 6, 6))
    ids = torch.randint(3, 60, (1, 12), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 60
    torch.testing.assert_close(w.forward(ids)[:, :-1], w.forward(changed)[:, :-1], atol=0, rtol=0)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_other_architectures_match_hf(tmp_path, model_type):
    d = make_tiny_model(tmp_path / model_type, model_type=model_type, num_layers=4)
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(3))
    ref, _ = hf_layer_outputs(d, ids)
    w1, w2 = StageWorker(StageSpec(str(d), 0, 2, 4)), StageWorker(StageSpec(str(d), 2, 4, 4))
    torch.testing.assert_close(w2.forward(w1.forward(ids)), ref[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("unit,kernel", [("token", "linear"), ("sample", "linear"), ("token", "rbf")])
def test_local_cka_equals_hf_hidden_states(tiny_model, unit, kernel):
    """Streaming CKA from 2 stages == minibatch CKA over the full model's hidden states."""
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 60, (16, 24), generator=gen)
    batches = [(b, ids[4 * b:4 * b + 4]) for b in range(4)]
    spec = StatsSpec(kernel=kernel, unit=unit, tokens_per_batch=48, seed=7)
    reducer = LocalBackend().calibrate([StageSpec(str(tiny_model), 0, 3, 6), StageSpec(str(tiny_model), 3, 6, 6)],
                                       spec, batches)
    reps, cosines = [], []
    for b, x in batches:
        outs, _ = hf_layer_outputs(tiny_model, x)
        index = similarity.sample_token_index(4, 24, 48, 7, b) if unit == "token" else None
        reps.append([similarity.layer_representation(h, unit, index) for h in outs])
        # Layer l maps outs[l] to outs[l+1]; position 0 of every sequence is left out (skip_first_token).
        cosines.append(torch.stack([torch.nn.functional.cosine_similarity(
            outs[l][:, 1:].double(), outs[l + 1][:, 1:].double(), dim=-1).flatten() for l in range(6)]))
    expected = similarity.minibatch_cka(reps, kernel)
    # Grams travel as float32: agreement to ~1e-5 relative on CKA values in [0, 1].
    torch.testing.assert_close(reducer.cka(), expected, atol=1e-4, rtol=0)
    assert reducer.num_batches == 4
    # Block Influence (ShortGPT): 1 - mean cos(input, output) over every token row of every batch.
    cos = torch.cat(cosines, dim=1)  # [6 layers, 4 batches x 4 samples x 23 positions]
    assert cos.shape == (6, 4 * 4 * 23)
    assert reducer.counts.tolist() == [4 * 4 * 23] * 6
    torch.testing.assert_close(reducer.block_influence().double(), 1 - cos.mean(dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(reducer.angular_distance().double(), (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean(1),
                               atol=1e-5, rtol=0)


def test_cache_stride_keeps_fewer_inputs_and_recomputes_the_others_exactly(tiny_model):
    # calibration.cache_stride=4: inputs of layers 0 and 4 kept (stage [0, 6)); every other layer's is
    # recomputed from the one below, bit for bit what the every-layer cache holds, and a candidate
    # plan scores the same.
    ids = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(5))
    every = StageWorker(StageSpec(str(tiny_model), 0, 6, 6), StatsSpec(unit="token", tokens_per_batch=8))
    strided = StageWorker(StageSpec(str(tiny_model), 0, 6, 6, cache_stride=4),
                          StatsSpec(unit="token", tokens_per_batch=8))
    for w in (every, strided):
        w.calibrate(0, ids, cache_inputs=True)
    assert len(every._cached_inputs[0]) == 6 and len(strided._cached_inputs[0]) == 2
    kept = [h.clone() for h in strided._cached_inputs[0]]
    for layer in range(6):
        torch.testing.assert_close(strided.cached_input(0, layer), every.cached_input(0, layer), atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(kept, strided._cached_inputs[0]))  # reads leave the cache as it was
    windows = [(2, 3)]
    torch.testing.assert_close(strided.run_candidate(0, None, windows, "mean", from_layer=2, input_ids=ids),
                               every.run_candidate(0, None, windows, "mean", from_layer=2, input_ids=ids),
                               atol=0, rtol=0)
    with pytest.raises(ValueError, match="cache_stride must be >= 1"):
        StageSpec(str(tiny_model), 0, 6, 6, cache_stride=0)


@pytest.mark.parametrize("rule", ["reference", "mean"])
def test_candidate_reruns_from_its_lowest_changed_layer_on_cached_inputs(tiny_model, rule):
    # The stage keeps every layer's original input, so a window high in the stage reruns only
    # from there: the result must equal rerunning the whole stage with the same windows applied.
    w = StageWorker(StageSpec(str(tiny_model), 0, 6, 6), StatsSpec(unit="token", tokens_per_batch=8))
    ids = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(3))
    w.calibrate(0, ids, cache_inputs=True)
    for layer in range(6):  # the cache holds each layer's original input
        expected = w._inputs(ids)
        ctx = w.context(expected)
        for i in range(layer):
            expected = w.run_layer(w.layers[i], i, expected, ctx)
        torch.testing.assert_close(w.cached_input(0, layer), expected, atol=0, rtol=0)
    windows = [(3, 4)]
    from_window = w.run_candidate(0, None, windows, rule, from_layer=3, input_ids=ids)
    from_start = w.run_candidate(0, None, windows, rule, from_layer=0, input_ids=ids)
    torch.testing.assert_close(from_window, from_start, atol=1e-6, rtol=0)
    original = w.run_candidate(0, None, [], rule, from_layer=0, input_ids=ids)
    assert not torch.allclose(from_window, original, atol=1e-4)  # the window did change the model
    with pytest.raises(ValueError, match="not held"):
        w.cached_input(0, 6)
