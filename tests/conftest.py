"""Shared fixtures. GPU tests are marked `@pytest.mark.gpu` and skipped where CUDA is missing."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is on disk; never reach for a hub


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU box)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_path():
    from glm_rl.models.glm45.presets import TINY_CHECKPOINT

    return TINY_CHECKPOINT


def pytest_addoption(parser):
    parser.addoption("--update-snapshots", action="store_true", help="rewrite committed command snapshots")


@pytest.fixture
def update_snapshots(request):
    return request.config.getoption("--update-snapshots")


@pytest.fixture(scope="session")
def two_node_cluster():
    """Two "hosts" on this machine (network namespaces joined by a veth pair) with a Ray head on the first and a
    Ray worker node on the second, token auth on: a `netns.TwoNodeCluster` (tests/netns.py says how to use it).
    Skipped, with the reason, where namespaces cannot be made (not root, no iproute2)."""
    from netns import NetnsUnavailable, TwoNodeCluster, unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = TwoNodeCluster()
    try:
        cluster.start()
    except NetnsUnavailable as e:
        cluster.close()
        pytest.skip(str(e))
    except BaseException:
        cluster.close()
        raise
    try:
        yield cluster
    finally:
        cluster.close()
