"""What the tool promises (README, "What the tool promises"), one test per bad input or hostile folder.

Each case runs the real command line in-process on a copy of the tiny model, and asserts the exit
code, that the message names the file, key or tensor, and that the source folder and any existing
outputs are byte-for-byte unchanged. The three security cases (remote code, writing into the source,
paths outside the folder) run on the Ray backend too.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from slm_dist import cli
from slm_dist.testing import make_tiny_model
from tests.conftest import folder_digest
from tests.test_pipeline import tiny_overrides

EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("pristine") / "model")


@pytest.fixture
def model(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "model"))


@pytest.fixture
def text(tiny_text_file) -> Path:
    return tiny_text_file


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(["--quiet", *argv])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def overrides(model: Path, text: Path, run_dir: Path, *extra: str) -> list[str]:
    return tiny_overrides(model, text, run_dir, "plan.target_layers_removed=2", *extra)


def refused(capsys, argv: list[str], *watched: Path) -> str:
    """Run a command that must fail with exit 2 and change nothing in ``watched``; its output."""
    before = {w: folder_digest(w) if w.is_dir() else None for w in watched}
    code, out = run_cli(capsys, *argv)
    assert code == cli.EXIT_BAD_INPUT, out
    assert "Traceback" not in out, out
    for w, digest in before.items():
        assert (folder_digest(w) if w.is_dir() else None) == digest, f"{w} changed"
    return out


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------- remote code
def plant_remote_code(model: Path, marker: Path) -> None:
    (model / "evil.py").write_text(EVIL.format(marker=str(marker)))
    edit_json(model / "config.json", lambda c: c.update(auto_map={"AutoConfig": "evil.EvilConfig",
                                                                  "AutoModelForCausalLM": "evil.EvilModel"}))
    edit_json(model / "tokenizer_config.json", lambda c: c.update(auto_map={"AutoTokenizer": ["evil.Tok", None]}))


def test_auto_map_never_runs_code_and_is_dropped_from_the_output(model, text, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    plant_remote_code(model, marker)
    before = folder_digest(model)
    code, out = run_cli(capsys, "run", *overrides(model, text, tmp_path / "run", "eval.enabled=false"))
    assert code == cli.EXIT_OK, out
    assert not marker.exists(), "the model folder's Python file ran"
    assert "auto_map" in out and "ignored" in out  # the warning says so
    written = tmp_path / "run" / "model"
    assert "auto_map" not in json.loads((written / "config.json").read_text())
    assert "auto_map" not in json.loads((written / "tokenizer_config.json").read_text())
    assert not (written / "evil.py").exists()
    assert folder_digest(model) == before


@pytest.mark.slow
def test_auto_map_never_runs_code_in_ray_stage_actors(model, text, tmp_path, capsys):
    """The stage actors build their layers from the folder too (calibration through Ray: `plan`)."""
    pytest.importorskip("ray")
    marker = tmp_path / "code-ran"
    plant_remote_code(model, marker)
    before = folder_digest(model)
    code, out = run_cli(capsys, "plan", *overrides(model, text, tmp_path / "run", "cluster.backend=ray"))
    assert code == cli.EXIT_OK, out
    assert (tmp_path / "run" / "plan.json").is_file()
    assert not marker.exists(), "the model folder's Python file ran"
    assert folder_digest(model) == before


def test_a_tokenizer_that_exists_only_as_folder_code_is_refused(model, text, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    plant_remote_code(model, marker)
    edit_json(model / "tokenizer_config.json", lambda c: c.update(tokenizer_class="EvilTokenizer"))
    out = refused(capsys, ["run", *overrides(model, text, tmp_path / "run")], model)
    assert "tokenizer_config.json" in out and "EvilTokenizer" in out
    assert not marker.exists() and not (tmp_path / "run").exists()


# --------------------------------------------------------------------- never write in the source
@pytest.mark.parametrize("backend", ["local", "ray"])
@pytest.mark.parametrize("where, key", [(".", "run.dir"), ("runs/a", "run.dir"), ("out", "merge.output_dir")])
def test_outputs_in_the_source_folder_are_refused_before_any_write(model, text, tmp_path, capsys, where, key,
                                                                    backend):
    target = (model / where).resolve()
    extra = [f"merge.output_dir={target}"] if key == "merge.output_dir" else []
    run_dir = target if key == "run.dir" else tmp_path / "run"
    out = refused(capsys, ["run", *overrides(model, text, run_dir, f"cluster.backend={backend}", *extra)], model)
    assert f"{key}=" in out and "never writes into its input" in out
    assert not (tmp_path / "run").exists()


def test_heal_output_in_the_source_folder_is_refused(model, text, tmp_path, capsys):
    out = refused(capsys, ["heal", *overrides(model, text, tmp_path / "run", f"heal.model={model}",
                                              f"heal.output_dir={model / 'healed'}")], model)
    assert "heal.output_dir=" in out and "model to heal" in out


@pytest.mark.parametrize("output, message", [("run", "same folder"), ("run/..", "inside merge.output_dir")])
def test_outputs_must_be_distinct(model, text, tmp_path, capsys, output, message):
    run_dir = tmp_path / "run"
    out = refused(capsys, ["run", *overrides(model, text, run_dir, f"merge.output_dir={tmp_path / output}")], model)
    assert message in out
    assert not run_dir.exists()


# --------------------------------------------------------------------- nothing read outside the folder
def move_first_shard(model: Path, new_entry) -> tuple[str, Path]:
    """Point the index's entries for the first shard at ``new_entry(shard_path)``; return the entry."""
    index_path = model / "model.safetensors.index.json"
    data = json.loads(index_path.read_text())
    shard = sorted(set(data["weight_map"].values()))[0]
    entry = new_entry(model / shard)
    data["weight_map"] = {k: (entry if v == shard else v) for k, v in data["weight_map"].items()}
    index_path.write_text(json.dumps(data))
    return entry, model / shard


def outside_parent(model: Path, shard: Path) -> str:
    shutil.copy(shard, model.parent / "outside.safetensors")
    return "../outside.safetensors"


@pytest.mark.parametrize("backend", ["local", "ray"])
@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_shard_paths_outside_the_folder_are_refused(model, text, tmp_path, capsys, kind, backend):
    def entry(shard: Path) -> str:
        if kind == "parent":
            return outside_parent(model, shard)
        if kind == "absolute":
            return "/etc/passwd"
        outside = model.parent / "elsewhere.safetensors"
        shutil.move(shard, outside)
        shard.symlink_to(outside)  # same name in the folder, the bytes outside it
        return shard.name
    name, _ = move_first_shard(model, entry)
    out = refused(capsys, ["run", *overrides(model, text, tmp_path / "run", f"cluster.backend={backend}")], model)
    assert "model.safetensors.index.json" in out and repr(name) in out and "weight_map[" in out
    assert ("outside the model folder" in out) or ("absolute path" in out)
    assert not (tmp_path / "run").exists()


def test_a_side_file_linked_outside_is_refused(model, text, tmp_path, capsys):
    secret = tmp_path / "secret.json"
    shutil.move(model / "tokenizer.json", secret)
    (model / "tokenizer.json").symlink_to(secret)
    out = refused(capsys, ["run", *overrides(model, text, tmp_path / "run")], model)
    assert "'tokenizer.json'" in out and "outside the model folder" in out


# --------------------------------------------------------------------------- checked before work
def test_a_shape_that_disagrees_with_the_config_is_found_by_inspect_and_run(model, text, tmp_path, capsys):
    edit_json(model / "config.json", lambda c: c.update(intermediate_size=c["intermediate_size"] + 8))
    out = refused(capsys, ["inspect", str(model)], model)
    assert "mlp.up_proj.weight has shape" in out and "intermediate_size" in out
    out = refused(capsys, ["run", *overrides(model, text, tmp_path / "run")], model)
    assert "mlp.down_proj.weight has shape" in out
    assert not (tmp_path / "run").exists()


def test_an_unwritable_output_is_found_before_calibration(model, text, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = refused(capsys, ["run", *overrides(model, text, tmp_path / "run", f"merge.output_dir={blocker / 'out'}")],
                  model, blocker)
    assert "merge.output_dir=" in out and "is a file" in out
    assert not (tmp_path / "run").exists()


def test_a_missing_heldout_file_is_found_before_calibration(model, text, tmp_path, capsys):
    out = refused(capsys, ["run", *overrides(model, text, tmp_path / "run", f"eval.heldout={tmp_path / 'nope.txt'}")],
                  model)
    assert "eval.heldout" in out and "nope.txt" in out
    assert not (tmp_path / "run").exists()


def test_an_unreachable_cluster_fails_in_seconds_naming_the_address(model, text, tmp_path, capsys):
    out = refused(capsys, ["run", *overrides(model, text, tmp_path / "run", "cluster.backend=ray",
                                             "cluster.address=127.0.0.1:9")], model)
    assert "cluster.address='127.0.0.1:9'" in out
    assert not (tmp_path / "run").exists()


class _NotRay:
    """Servers that accept a connection but are not a Ray head."""

    @staticmethod
    def http():
        import http.server
        import threading

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server.server_address[1], server.shutdown

    @staticmethod
    def grpc(abort_code=None):
        from concurrent.futures import ThreadPoolExecutor

        import grpc

        server = grpc.server(ThreadPoolExecutor(1))
        if abort_code is not None:   # every call refused with this status (as a token-auth Ray head refuses)
            class Refuse(grpc.GenericRpcHandler):
                def service(self, details):
                    return grpc.unary_unary_rpc_method_handler(lambda request, ctx: ctx.abort(abort_code, "no token"))
            server.add_generic_rpc_handlers((Refuse(),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        return port, lambda: server.stop(0)


@pytest.mark.parametrize("kind, needle", [("http", "not a Ray GCS"), ("grpc", "not a Ray GCS"),
                                          ("unauthenticated", "RAY_AUTH_MODE=token")])
def test_a_listener_that_is_not_a_ray_head_is_refused_before_work(model, text, tmp_path, capsys, kind, needle):
    """A port that accepts TCP is not enough: the dashboard's, another service's, or a head that wants a token."""
    import grpc

    port, stop = (_NotRay.http() if kind == "http" else
                  _NotRay.grpc(grpc.StatusCode.UNAUTHENTICATED if kind == "unauthenticated" else None))
    try:
        out = refused(capsys, ["run", *overrides(model, text, tmp_path / "run", "cluster.backend=ray",
                                                 f"cluster.address=127.0.0.1:{port}")], model)
    finally:
        stop()
    assert f"cluster.address='127.0.0.1:{port}'" in out and needle in out
    assert not (tmp_path / "run").exists()


def test_the_dry_run_lists_every_problem_at_once(model, text, tmp_path, capsys):
    edit_json(model / "config.json", lambda c: c.update(intermediate_size=c["intermediate_size"] + 8))
    binary = write(tmp_path / "heldout.txt", b"\x00\x01binary")
    out = refused(capsys, ["plan", "--dry-run", *overrides(model, text, model / "run", f"eval.heldout={binary}",
                                                           "cluster.backend=ray", "cluster.address=127.0.0.1:9")],
                  model)
    for needle in ("has shape", "eval.heldout", "run.dir=", "cluster.address"):
        assert needle in out, needle


@pytest.fixture(scope="module")
def finished(pristine, tiny_text_file, tmp_path_factory) -> tuple[Path, Path]:
    """(model, run folder) of one finished tiny run, shared: tests copy what they change."""
    root = tmp_path_factory.mktemp("finished")
    model = Path(shutil.copytree(pristine, root / "model"))
    code = cli.main(["--quiet", "run", *overrides(model, tiny_text_file, root / "run", "eval.enabled=false")])
    assert code == cli.EXIT_OK
    return model, root / "run"


def test_outputs_of_a_finished_run_are_left_alone_by_a_refused_rerun(finished, text, tmp_path, capsys):
    model = Path(shutil.copytree(finished[0], tmp_path / "model"))
    run_dir = Path(shutil.copytree(finished[1], tmp_path / "run"))
    (model / "config.json").write_text("[]")
    out = refused(capsys, ["run", *overrides(model, text, run_dir, "eval.enabled=false")], run_dir)
    assert "config.json must hold a JSON object" in out


# ------------------------------------------------------------------------ errors, not tracebacks
def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.mark.parametrize("content, needle", [
    ("model:\n  path: [unclosed\n", "line 3"),
    (b"model:\n  path: \xff\xfe\n", "not UTF-8"),
    ("", "slm-dist run` and no config file"),
])
def test_a_bad_config_file_is_one_line(tmp_path, capsys, content, needle):
    path = write(tmp_path / "c.yaml", content)
    out = refused(capsys, ["run", str(path)])
    assert str(path) in out and needle in out


def test_a_config_path_that_is_a_folder(tmp_path, capsys):
    out = refused(capsys, ["run", str(tmp_path)])
    assert "is a folder" in out


@pytest.mark.parametrize("argv, needle", [
    (["run", "a.yaml", "b.yaml"], "unexpected argument 'b.yaml'"),
    (["eval", ".", "--task", "piqa"], "--task takes NAME=FILE"),
])
def test_usage_errors_exit_2(capsys, argv, needle):
    assert needle in refused(capsys, argv)


def test_binary_calibration_text(model, tmp_path, capsys):
    binary = write(tmp_path / "cal.txt", bytes(range(256)) * 4)
    out = refused(capsys, ["run", *overrides(model, binary, tmp_path / "run", f"eval.heldout={binary}")], model)
    assert "calibration.source" in out and "cal.txt" in out and "binary" in out


def test_binary_perplexity_text(model, tmp_path, capsys):
    binary = write(tmp_path / "ppl.txt", b"abc\xff\xfe\x00def")
    out = refused(capsys, ["eval", str(model), "--ppl", str(binary)], model)
    assert "perplexity text" in out and "ppl.txt" in out


@pytest.mark.parametrize("config, needle", [
    ("[1, 2]", "must hold a JSON object, got a list"),
    ('{"model_type": "llama", "hidden_size": 32}', "num_hidden_layers is None"),
    ("{not json", "line 1, column 2"),
])
def test_a_bad_config_json(model, capsys, config, needle):
    (model / "config.json").write_text(config)
    out = refused(capsys, ["inspect", str(model)], model)
    assert "config.json" in out and needle in out


@pytest.mark.parametrize("index, needle", [("{bad", "not valid JSON"), ('{"weight_map": [1]}', "no weight_map"),
                                           ('{"weight_map": {"a": 3}}', "weight_map['a'] is 3")])
def test_a_malformed_safetensors_index(model, capsys, index, needle):
    (model / "model.safetensors.index.json").write_text(index)
    out = refused(capsys, ["inspect", str(model)], model)
    assert "model.safetensors.index.json" in out and needle in out


def finished_checkpoint(finished, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished[1] / "model", tmp_path / "out"))


def test_verify_names_a_shard_whose_header_has_a_flipped_byte(finished, tmp_path, capsys):
    out_dir = finished_checkpoint(finished, tmp_path)
    shard = sorted(out_dir.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    at = data.index(b"data_offsets", 8, 8 + n)
    data[at + 4] ^= 0x20  # data_offsets -> data_Offsets
    shard.write_bytes(bytes(data))
    code, out = run_cli(capsys, "verify", str(out_dir))
    assert code == cli.EXIT_FAILURE and "Traceback" not in out
    assert f"{shard.name}: xxh3_128 differs" in out and f"{shard}" in out and "corrupt header" in out
    out = refused(capsys, ["inspect", str(out_dir)], out_dir)
    assert shard.name in out and "data_offsets" in out


def test_verify_a_malformed_manifest(finished, tmp_path, capsys):
    out_dir = finished_checkpoint(finished, tmp_path)
    (out_dir / "manifest.json").write_text("{oops")
    code, out = run_cli(capsys, "verify", str(out_dir))
    assert code == cli.EXIT_FAILURE and "Traceback" not in out
    assert "manifest.json is not valid JSON" in out


def test_verify_a_missing_folder_is_one_error(tmp_path, capsys):
    out = refused(capsys, ["verify", str(tmp_path / "nope")])
    assert len([line for line in out.splitlines() if line.strip()]) == 1


def test_a_pickle_that_fails_to_load(model, capsys):
    for f in list(model.glob("*.safetensors")) + [model / "model.safetensors.index.json"]:
        f.unlink()
    (model / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    out = refused(capsys, ["inspect", str(model), "--allow-pickle"], model)
    assert "pytorch_model.bin does not load" in out
    out = refused(capsys, ["inspect", str(model)], model)
    assert "allow_pickle" in out


@pytest.mark.parametrize("rows, needle", [
    ('[1, 2]\n', "task.jsonl:1 is a JSON list, not an object"),
    ('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n{"goal": "a", "sol1": "b", "sol2": "c", "label": 5}\n',
     "task.jsonl:2: gold answer 5"),
])
def test_a_bad_task_row_names_file_and_line(model, tmp_path, capsys, rows, needle):
    task = write(tmp_path / "task.jsonl", rows)
    out = refused(capsys, ["eval", str(model), "--task", f"piqa={task}"], model)
    assert needle in out


def test_debug_shows_the_traceback(tmp_path, capsys):
    path = write(tmp_path / "c.yaml", "")
    code, out = run_cli(capsys, "--debug", "run", str(path))
    assert code == cli.EXIT_BAD_INPUT and "Traceback" in out


def test_every_transformers_load_in_the_package_refuses_remote_code():
    """A static check: each `from_pretrained(...)` call under slm_dist/ passes trust_remote_code=False."""
    import ast

    package = Path(__file__).resolve().parents[1] / "slm_dist"
    calls, missing = 0, []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                calls += 1
                ok = any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False
                         for k in node.keywords)
                if not ok:
                    missing.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert calls >= 3 and not missing, missing
