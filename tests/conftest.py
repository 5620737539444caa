"""Session-wide fixtures: one local Ray cluster and one control plane for the whole run.

Ray on 2 cores is slow to start, so the cluster is started once (through `orch up`, the
same path users take) with fake GPU capacity, on ports of its own so it never touches a
cluster or server the developer has running.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support import FAKE_CPUS, FAKE_GPUS, SESSION_CLUSTER_PORTS, object_store, offset_ports, run_orch


# A wrapper: the groups are set before any other plugin's hook of this name runs
# (pytest-xdist reads them in its own), and the order after all of them (pytest-randomly
# shuffles).
@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> Iterator[None]:
    """`make test` runs the tests in two processes (pytest-xdist, `--dist loadgroup`). The
    tests that need the session's Ray cluster all run in one of them, so a run starts one
    cluster; every other module's tests run together in one process (a module's servers,
    ports and module-scoped fixtures are its own), in either process meanwhile. The Ray
    tests, the longest share, come first (with `--no-loadscope-reorder`, xdist hands the
    groups out in this order), so the other process does the rest alongside them."""
    for item in items:
        group = "ray" if item.get_closest_marker("ray") else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
    result = yield
    items.sort(key=lambda item: item.get_closest_marker("ray") is None)  # stable
    return result


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Under `--dist loadgroup`, fail at once if pytest-xdist did not tag the groups (it
    cannot on some pytest releases): the Ray tests would start a cluster per process."""
    if not session.config.getoption("loadgroup", default=False):
        return
    untagged = [item.nodeid for item in session.items
                if item.get_closest_marker("ray") and not item.nodeid.endswith("@ray")]
    if untagged:
        raise pytest.UsageError(
            f"pytest-xdist did not group {untagged[0]} with the Ray tests; use a pytest "
            "release it supports (pyproject.toml's test extra pins one)")


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """A local S3-compatible object store for the session; the AWS_* settings that reach it."""
    with object_store() as env:
        yield env


@pytest.fixture(scope="session")
def orch_env(tmp_path_factory: pytest.TempPathFactory, s3_env: dict[str, str]) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("orch-home")
    # Two test sessions on one machine (e.g. two checkouts) need ports of their own.
    offset = int(os.environ.get("ORCH_TEST_PORT_OFFSET", "0"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "RAY_", "AWS_"))}
    # The cluster's nodes and the control plane can reach the session's object store, as a
    # team's cluster reaches its bucket (s3:// checkpoint storage).
    env.update(s3_env)
    # The cluster's ports (the client port below Ray's worker ports 10002-19999) are those
    # `.ci/run` cleans up after an interrupted run (tests.support.stop_test_clusters).
    env.update({key: str(port) for key, port in offset_ports(SESSION_CLUSTER_PORTS).items()})
    env.update(
        ORCH_HOME=str(home),
        ORCH_SERVER_PORT=str(8771 + offset),
        ORCH_SCHEDULER_INTERVAL="0.3",
        ORCH_CLUSTER_LOSS_GRACE="8",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    run_orch(env, "up", "--num-gpus", str(FAKE_GPUS), "--num-cpus", str(FAKE_CPUS),
             timeout=240, check=True)
    try:
        yield env
    finally:
        run_orch(env, "down", timeout=120)


@pytest.fixture(scope="session")
def orch_store(orch_env: dict[str, str]) -> Iterator[object]:
    """The control plane's own store, opened read-side by the tests."""
    from orchestrator.store import Store

    store = Store(f"sqlite:///{orch_env['ORCH_HOME']}/orch.db")
    yield store
    store.close()
