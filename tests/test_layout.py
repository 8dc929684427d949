"""The package layout holds (README, "Layout"): every import points down the floors, `ray` lives in
`backends/` only, model files are opened in `checkpoint/` only, and `core/` is pure math."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "slm_dist"

# Lowest first. A module may import modules of its own floor or below, never above (the import
# cycle check, ../shared/tools/import_cycles.py, keeps each floor acyclic).
FLOORS: list[tuple[str, ...]] = [
    ("slm_dist", "slm_dist.config", "slm_dist.arch", "slm_dist.host_memory", "slm_dist.calibration",
     "slm_dist.testing", "slm_dist.progress", "slm_dist.extras", "slm_dist.logs"),
    ("slm_dist.core",),
    ("slm_dist.checkpoint",),
    ("slm_dist.workers",),
    ("slm_dist.backends",),
    ("slm_dist.context", "slm_dist.run_state", "slm_dist.assets"),
    ("slm_dist.planning", "slm_dist.merging", "slm_dist.evaluation", "slm_dist.heal", "slm_dist.dryrun",
     "slm_dist.report", "slm_dist.preflight", "slm_dist.lm_eval_adapter"),
    ("slm_dist.pipeline",),
    ("slm_dist.compare",),
    ("slm_dist.cli", "slm_dist.__main__"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str) -> int:
    best, depth = None, -1
    for k, names in enumerate(FLOORS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > depth:
                best, depth = k, len(name)
    if best is None:
        raise AssertionError(f"{module} is on no floor: add it to FLOORS in tests/test_layout.py and the README")
    return best


def imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module, line) of every import in the file, those inside functions and TYPE_CHECKING too."""
    name = module_name(path)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(package + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return out


SOURCES = sorted(PACKAGE.rglob("*.py"))
KNOWN = {module_name(p) for p in SOURCES}


def resolve(target: str) -> str | None:
    while target and target not in KNOWN:
        target = target.rpartition(".")[0]
    return target or None


def test_every_import_points_down_the_floors():
    upward = []
    for path in SOURCES:
        source = module_name(path)
        for target, line in imports(path):
            target = resolve(target) if target.startswith("slm_dist") else None
            if target and target != source and floor_of(target) > floor_of(source):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} "
                              f"(floor {floor_of(target)} above {floor_of(source)})")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("package, allowed", [("ray", "slm_dist.backends"), ("safetensors", "slm_dist.checkpoint")])
def test_ray_and_model_file_access_live_in_one_folder(package, allowed):
    outside = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in SOURCES for target, line in imports(path)
               if target.split(".")[0] == package and not module_name(path).startswith(allowed)]
    assert not outside, f"{package} imported outside {allowed}: {outside}"


def test_core_is_pure_math():
    """Importing any core module loads no Ray, no safetensors, no transformers (a fresh interpreter)."""
    core = sorted(module_name(p) for p in (PACKAGE / "core").glob("*.py"))
    assert "slm_dist.core.planner" in core and len(core) >= 10
    code = ("import importlib, json, sys\n"
            f"for m in {core!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('ray', 'safetensors', 'transformers', 'accelerate', 'pyarrow', 'matplotlib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert json.loads(out) == []


def test_core_opens_no_files():
    calls = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "safe_open", "load_file", "save_file"}
    found = [f"{p.name}:{n.lineno}" for p in (PACKAGE / "core").glob("*.py") for n in ast.walk(ast.parse(p.read_text()))
             if isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", None)) in calls]
    assert not found, f"file access in core/: {found}"


def test_the_layout_check_sees_an_upward_import(tmp_path):
    """The floor test is not vacuous: a core module importing the pipeline is reported."""
    assert floor_of("slm_dist.core.merge") < floor_of("slm_dist.pipeline")
    assert floor_of("slm_dist.backends.ray") > floor_of("slm_dist.workers.stage_worker")
    with pytest.raises(AssertionError, match="on no floor"):
        floor_of("slm_dist_other.module")
