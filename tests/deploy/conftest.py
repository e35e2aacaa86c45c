"""Fixtures of the deployment tests."""

import pytest


@pytest.fixture(scope="session")
def cpu_image() -> str:
    """The CPU image's tag, built once per session through scripts/build-images.sh (tests/deploy/containers.py: the
    Docker engine is started where it is not running; the test is skipped where none can be)."""
    from tests.deploy.containers import build_cpu_image

    return build_cpu_image()
