"""The output as a Hub model, offline: the model card's metadata, licence files carried over, a repo id
resolved from a populated Hub cache with HF_HUB_OFFLINE=1, and `slm-dist push` up to the network call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from slm_dist import cli
from slm_dist.checkpoint import hub
from slm_dist.checkpoint.export import OUTPUT_MARKER, plan_export, write_export
from slm_dist.checkpoint.index import CheckpointError, open_index
from slm_dist.checkpoint.lock import LOCK_NAME
from slm_dist.checkpoint.verify import verify_model
from slm_dist.core.planner import MergePlan
from slm_dist.testing import make_tiny_model
from slm_dist.workers.merge_worker import run_jobs_in_threads

WINDOWS = ((1, 2), (3, 5))
LICENCES = {"LICENSE": "the licence text\n", "USE_POLICY.md": "use it well\n", "NOTICE": "notice\n"}
SOURCE_CARD = "---\nlicense: llama3.2\nlicense_name: llama3.2\nlanguage: en\n---\n# The base model\n"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = make_tiny_model(tmp_path_factory.mktemp("src") / "tiny-llama")
    for name, text in LICENCES.items():
        (root / name).write_text(text)
    (root / "README.md").write_text(SOURCE_CARD)
    return root


def _export(source: Path, out: Path) -> Path:
    write_export(plan_export(open_index(source), MergePlan(6, WINDOWS, "mean", "cka", 0.875), out, 20_000),
                 run_jobs_in_threads)
    return out


def _hub_cache(tmp_path: Path, source: Path, repo_id: str, extra: dict[str, str] | None = None) -> Path:
    """The Hub cache layout huggingface_hub reads: models--org--name/{refs/main, snapshots/<rev>/files}."""
    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(source, snapshot)
    for name, text in (extra or {}).items():
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return cache


def _offline(monkeypatch, cache: Path) -> None:
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=cache for this test: the environment (what a subprocess and a
    fresh import see) and huggingface_hub's constants, which it read when this process imported it."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# ------------------------------------------------------------------------------- model card
def test_the_card_parses_as_a_hub_model_card_with_metadata_and_no_local_path(source, tmp_path):
    out = _export(source, tmp_path / "out")
    text = (out / "README.md").read_text()
    data = ModelCard(text).data
    assert data.base_model == "tiny-llama"   # a local source: its folder name
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert set(data.tags) >= {"pruned", "depth-pruning", "slm-dist", "sliding-layer-merging"}
    assert data.license == "llama3.2" and data.license_name == "llama3.2"   # carried over from the source card
    assert ModelCard.load(out / "README.md").data.to_dict() == data.to_dict()
    for fact in ("[1..2], [3..5]", "`mean`", "0.875", "6 -> 3", "correction: none", "`cka`"):
        assert fact in text, fact
    assert str(source) not in text and str(tmp_path) not in text and "/" + source.parts[1] not in text
    for name, licence in LICENCES.items():
        assert (out / name).read_text() == licence, name
    assert verify_model(out) == []   # the copied licence files are in the manifest


def test_a_source_from_the_hub_cache_is_named_by_its_repo_id_and_a_licence_in_config_is_kept(tmp_path):
    src = make_tiny_model(tmp_path / "plain")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "license": "apache-2.0"}))
    snapshot = next((_hub_cache(tmp_path, src, "SomeOrg/Tiny-Llama") / "models--SomeOrg--Tiny-Llama" /
                     "snapshots").iterdir())
    out = _export(snapshot, tmp_path / "out")
    data = ModelCard.load(out / "README.md").data
    assert data.base_model == "SomeOrg/Tiny-Llama" and data.license == "apache-2.0"
    assert not [p for p in out.iterdir() if p.name.upper().startswith("LICEN")]   # none to copy


def test_a_source_without_licence_gives_a_card_without_one(tmp_path):
    out = _export(make_tiny_model(tmp_path / "plain"), tmp_path / "out")
    assert ModelCard.load(out / "README.md").data.license is None


# ------------------------------------------------------------------------------- repo ids
def test_a_repo_id_resolves_from_an_offline_hub_cache(source, tmp_path, monkeypatch):
    cache = _hub_cache(tmp_path, source, "HuggingFaceTB/Tiny-135M",
                       {"pytorch_model.bin": "not a pickle", "modeling_evil.py": "raise SystemExit"})
    _offline(monkeypatch, cache)
    folder = hub.resolve_model("HuggingFaceTB/Tiny-135M")
    assert folder.is_relative_to(cache) and hub.repo_id_of(folder) == "HuggingFaceTB/Tiny-135M"
    assert open_index(folder).num_layers == 6 and (folder / "LICENSE").is_file()
    # the allow patterns never ask for pickles or code (the offline cache holds them, so this is the patterns'
    # doing): snapshot_download's own answer for the fetch patterns excludes them
    from huggingface_hub.utils import filter_repo_objects

    kept = set(filter_repo_objects([p.name for p in folder.iterdir()], allow_patterns=list(hub.FETCH_PATTERNS)))
    assert {"config.json", "LICENSE", "USE_POLICY.md", "NOTICE", "tokenizer.json"} <= kept
    assert "pytorch_model.bin" not in kept and "modeling_evil.py" not in kept
    assert hub.resolve_model(source) == source   # an existing folder stays as it is


def test_a_repo_id_missing_from_the_offline_cache_and_a_non_id_are_clear_errors(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path / "empty")
    with pytest.raises(CheckpointError, match="Nobody/Nothing: the Hub cannot be reached.*HF_HUB_OFFLINE"):
        hub.resolve_model("Nobody/Nothing")
    for bad in ("no/such/folder", "./missing", "missing", "bad name/x y"):
        with pytest.raises(CheckpointError, match="neither an existing folder nor a Hub repo id"):
            hub.resolve_model(bad)


def test_cli_commands_take_a_repo_id(source, tmp_path, monkeypatch, capsys):
    """inspect and plan --dry-run resolve a repo id from the cache (run/eval go through resolve_inputs)."""
    _offline(monkeypatch, _hub_cache(tmp_path, source, "Org/Tiny"))
    assert cli.main(["inspect", "Org/Tiny"]) == 0
    assert json.loads(capsys.readouterr().out)["num_layers"] == 6
    assert cli.main(["plan", "--dry-run", "--json", "model.path=Org/Tiny", f"run.dir={tmp_path / 'run'}"]) == 0
    assert json.loads(capsys.readouterr().out)["num_layers"] == 6
    assert cli.main(["inspect", "Org/Missing"]) == 2


def test_resolve_inputs_fetches_a_repo_id(source, tmp_path, monkeypatch):
    from slm_dist.config import load_config
    from slm_dist.context import resolve_inputs

    _offline(monkeypatch, _hub_cache(tmp_path, source, "Org/Tiny"))
    text = tmp_path / "text.txt"
    text.write_text("the city of the river\n" * 20)
    config = load_config(None, ["model.path=Org/Tiny", f"calibration.source={text}", f"eval.heldout={text}"])
    ctx = resolve_inputs(config, None, False)
    assert hub.repo_id_of(ctx.model_dir) == "Org/Tiny" and (ctx.model_dir / "config.json").is_file()


# ------------------------------------------------------------------------------- push
class FakeApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_large_folder(self, **kwargs):
        self.calls.append(("upload_large_folder", kwargs["repo_id"], kwargs))


def test_push_uploads_the_verified_folder_without_lock_and_marker(source, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    out = _export(source, tmp_path / "run" / "model")
    assert (out / LOCK_NAME).exists() and (out / OUTPUT_MARKER).exists()
    (out / ".config.json.partial").write_text("{")
    (tmp_path / "run" / "report.json").write_text(json.dumps({"output": str(out)}))
    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    assert cli.main(["push", str(tmp_path / "run"), "me/tiny-pruned"]) == 0   # a run folder: its model
    (create, repo, kw), (upload, repo2, up) = api.calls
    assert (create, repo, kw["repo_type"], kw["exist_ok"]) == ("create_repo", "me/tiny-pruned", "model", True)
    assert (upload, repo2, Path(up["folder_path"]), up["repo_type"]) == \
        ("upload_large_folder", "me/tiny-pruned", out, "model")
    sent = set(filter_repo_objects([p.name for p in out.iterdir()], ignore_patterns=up["ignore_patterns"]))
    assert LOCK_NAME not in sent and OUTPUT_MARKER not in sent and ".config.json.partial" not in sent
    assert {"README.md", "config.json", "manifest.json", "LICENSE", "model.safetensors.index.json"} <= sent
    assert len([n for n in sent if n.endswith(".safetensors")]) >= 2


def test_push_refuses_an_incomplete_folder_before_any_call(source, tmp_path):
    out = _export(source, tmp_path / "out")
    (out / "model.safetensors.index.json").unlink()
    api = FakeApi()
    with pytest.raises(CheckpointError, match="not a complete, verified checkpoint"):
        hub.push_folder(out, "me/tiny-pruned", api=api)
    with pytest.raises(CheckpointError, match="not a Hub repo id"):
        hub.push_folder(out, "not an id", api=api)
    assert api.calls == []


def test_push_falls_back_to_upload_folder(source, tmp_path):
    out = _export(source, tmp_path / "out")

    class OlderApi:   # a huggingface_hub without upload_large_folder
        calls: list = []

        def create_repo(self, repo_id, **kwargs):
            return repo_id

        def upload_folder(self, **kwargs):
            self.calls.append(kwargs)

    api = OlderApi()
    hub.push_folder(out, "me/x", api=api)
    (call,) = api.calls
    assert call["repo_id"] == "me/x" and Path(call["folder_path"]) == out and LOCK_NAME in call["ignore_patterns"]
