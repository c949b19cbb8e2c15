"""The container tier: province nodes as Docker containers from locally built images.

The tier needs a Docker daemon and the images of containers/build-images.sh, which the
session fixture runs first (it is idempotent and quick when nothing changed; set
PLTC_BUILD=0 to only use images already built). Where the tier cannot run:

* in CI (`CI=true`, or `PLTC_TIER=required`) every container test FAILS with the reason;
* elsewhere (a laptop without Docker) every container test is SKIPPED with the reason,
  shown in pytest's summary (`-ra`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containers.cluster import BALANCER_IMAGE
from tests.containers.harness import NODE_IMAGE, PG_IMAGE, ContainerNetwork

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT_S = 1200


def tier_required() -> bool:
    """In CI the container tier must run: a missing Docker is a failure, not a skip."""
    return (
        os.environ.get("CI", "").lower() in ("true", "1", "yes")
        or os.environ.get("PLTC_TIER", "") == "required"
    )


def _unavailable() -> str | None:
    """Why the tier cannot run here, or None when it can."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as exc:
        return f"no Docker daemon answers ({exc.__class__.__name__}: {exc})"
    if os.environ.get("PLTC_BUILD", "1") != "0":
        try:
            result = subprocess.run(
                ["bash", str(ROOT / "containers" / "build-images.sh")],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return f"containers/build-images.sh took over {BUILD_TIMEOUT_S} s"
        if result.returncode != 0:
            return f"containers/build-images.sh failed:\n{result.stderr[-2000:]}"
    for image in (NODE_IMAGE, PG_IMAGE, BALANCER_IMAGE):
        try:
            client.images.get(image)
        except Exception:
            return f"image {image} is missing (run containers/build-images.sh)"
    client.close()
    return None


@pytest.fixture(scope="session")
def container_tier() -> None:
    """Docker answers and the images are built; else fail (CI) or skip (elsewhere)."""
    reason = _unavailable()
    if reason is None:
        return
    if tier_required():
        pytest.fail(f"the container tier must run in CI but cannot: {reason}", pytrace=False)
    pytest.skip(f"container tier skipped: {reason}")


@pytest.fixture(scope="module")
def provinces(request: pytest.FixtureRequest, container_tier: None) -> Iterator[ContainerNetwork]:
    """Three provinces (130000, 310000, 510000) as containers, one set per test module."""
    net = ContainerNetwork(name=request.module.__name__.rsplit(".", 1)[-1].replace("_", "-"))
    request.addfinalizer(net.close)
    net.start()
    yield net
