from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from slm_dist.config import ConfigError, SlmConfig, load_config, parse_override, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_demo():
    cfg = load_config()
    assert cfg.model.path is None and cfg.plan.target_layers_removed == 6
    assert cfg.output_dir == cfg.run.dir / "model"


def test_demo_runs_on_ray_and_the_shipped_demo_config_matches_the_no_config_run():
    from slm_dist.cli import DEMO_SETTINGS

    shipped = load_config(ROOT / "configs" / "default.yaml")
    assert shipped.cluster.backend == "ray"
    assert load_config(None, list(DEMO_SETTINGS)).cluster.backend == "ray"


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("name", ["default.yaml", "tiny.yaml"])
def test_shipped_configs_validate(name):
    path = ROOT / "configs" / name
    cfg = load_config(path)
    written = _leaves(yaml.safe_load(path.read_text()))
    loaded = _leaves(cfg.model_dump(mode="json"))
    # Every value the file sets is the value the config holds (none dropped, renamed or defaulted away).
    assert written and {key: loaded.get(key, "<missing>") for key in written} == written


def test_overrides_are_typed_and_nested():
    cfg = load_config(None, ["plan.threshold=0.9", "merge.rule=mean", "calibration.num_samples=8",
                             "model.path=/x/y"])
    assert cfg.plan.threshold == 0.9 and cfg.plan.target_layers_removed is None  # a target replaces the other
    assert cfg.merge.rule == "mean" and cfg.calibration.num_samples == 8
    assert cfg.model.path == Path("/x/y")


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(ValidationError, match="frozen") as top:
        cfg.plan = None  # type: ignore[misc]
    assert [(e["type"], e["loc"]) for e in top.value.errors()] == [("frozen_instance", ("plan",))]
    with pytest.raises(ValidationError, match="frozen") as nested:
        cfg.merge.rule = "sum"  # type: ignore[misc]
    assert [(e["type"], e["loc"]) for e in nested.value.errors()] == [("frozen_instance", ("rule",))]
    assert cfg.plan is not None and cfg.merge.rule == "reference"  # neither assignment went through


def test_unknown_key_names_its_path_and_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"plan\.treshold: unknown key \(did you mean plan\.threshold\?\)"):
        load_config(None, ["plan.treshold=0.5"])
    path = tmp_path / "c.yaml"
    path.write_text("similarity:\n  kernal: rbf\n")
    with pytest.raises(ConfigError, match=r"similarity\.kernal: unknown key"):
        load_config(path)


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5"])
def test_threshold_outside_unit_interval(value):
    with pytest.raises(ConfigError, match=r"plan\.threshold must be in \(0, 1\]"):
        load_config(None, [f"plan.threshold={value}"])


def test_bad_enum_names_key_and_value():
    with pytest.raises(ConfigError, match=r"merge\.rule.*'median'"):
        load_config(None, ["merge.rule=median"])


def test_output_criterion_requires_threshold():
    with pytest.raises(ConfigError, match="criterion=output needs plan.threshold"):
        load_config(None, ["similarity.criterion=output"])
    cfg = load_config(None, ["similarity.criterion=output", "plan.threshold=0.95"])
    assert cfg.similarity.criterion == "output"


def test_score_batches_beyond_the_calibration_batches_is_refused():
    with pytest.raises(ConfigError, match=r"plan\.score_batches=5 but calibration has only 4 batches"):
        load_config(None, ["calibration.num_samples=32", "calibration.batch_size=8", "plan.score_batches=5",
                                 "plan.target_layers_removed=6"])
    assert load_config(None, ["calibration.num_samples=33", "calibration.batch_size=8",
                              "plan.score_batches=5", "plan.target_layers_removed=6"]).plan.score_batches == 5


def test_sleb_search_refuses_what_it_cannot_honour():
    base = ["plan.search=sleb"]
    with pytest.raises(ConfigError, match="plan.search=sleb removes a number of layers"):
        load_config(None, [*base, "plan.threshold=0.9"])
    with pytest.raises(ConfigError, match="unset plan.max_window"):
        load_config(None, [*base, "plan.target_layers_removed=2", "plan.max_window=2"])
    with pytest.raises(ConfigError, match="the published output loop is its own search"):
        load_config(None, [*base, "plan.target_layers_removed=2", "similarity.criterion=output"])
    assert load_config(None, [*base, "plan.target_layers_removed=2"]).plan.search == "sleb"


def test_remote_code_refused():
    with pytest.raises(ConfigError, match="trust_remote_code"):
        load_config(None, ["model.trust_remote_code=true"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="not key=value"):
        parse_override("plan.threshold")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["plan=3", "plan.threshold=0.5"])


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["plan.threshold=0.8", "cluster.num_stages=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg
    assert isinstance(cfg, SlmConfig)
