"""The cluster files agree with each other: the YAMLs run the image cluster/Dockerfile builds, on the
Ray version the Dockerfile's base and constraints.txt pin. (Building the image needs a container
daemon and Docker Hub, neither of which the test machine has: cluster/README.md, "The image".)"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def dockerfile_tag() -> str:
    """The CUDA tag the Dockerfile's header tells you to build (the default VARIANT)."""
    text = (CLUSTER / "Dockerfile").read_text()
    default = re.search(r"^ARG VARIANT=(\w+)$", text, re.M).group(1)
    builds = dict(re.findall(r"docker build -f cluster/Dockerfile (?:--build-arg VARIANT=(\w+) )?-t (\S+) \.", text))
    assert default == "gpu" and "cpu" in builds and "" in builds
    return builds[""]


def images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for v in node.values() for i in images(v)]
    if isinstance(node, list):
        return [i for v in node for i in images(v)]
    return []


def test_the_yamls_run_the_image_the_dockerfile_builds():
    tag = dockerfile_tag()
    rayjob = list(yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()))
    launcher = yaml.safe_load((CLUSTER / "ray-cluster-gpu.yaml").read_text())
    assert set(images(rayjob)) == {tag}
    assert launcher["docker"]["image"] == tag
    assert tag.endswith("-gpu") and ":" in tag


def test_one_ray_version_everywhere():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)
    pinned = re.search(r"^ray==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    rayjob = next(yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()))
    assert base == pinned == rayjob["spec"]["rayClusterSpec"]["rayVersion"]


def test_the_image_holds_what_the_rayjob_entrypoint_runs():
    """The entry point runs /opt/slm-dist/launch.py on a config under /opt/slm-dist/configs."""
    text = (CLUSTER / "Dockerfile").read_text()
    entry = next(yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()))["spec"]["entrypoint"]
    assert "WORKDIR /opt/slm-dist" in text and "COPY --chown=ray:users launch.py ./" in text
    assert "COPY --chown=ray:users configs ./configs" in text
    for path in re.findall(r"/opt/slm-dist/(\S+)", entry):
        assert (REPO / path).is_file(), path
