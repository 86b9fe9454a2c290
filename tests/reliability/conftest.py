"""The reliability suite's shared cluster and its marker.

Every scenario here ends by asserting that the cluster is idle again (tests.support.cluster_harness.assert_idle): the router holds no request, no worker has a
request in flight, running or waiting, and every worker's KV blocks are all free (cached blocks sit in the free
list, so an idle worker's free count is its total). A leak anywhere — a zombie registration in the router, an
admission a decode worker never released, a prefill task nobody aborted — fails the scenario that caused it.
"""
from __future__ import annotations

import pytest

from tests.support.cluster_harness import LocalCluster


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/reliability/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(scope="package")
def cluster(tiny_model_factory):
    """1 prefill + 2 decode workers on the serving tiny model, as the issue's hostile-client runs used; one for the
    whole suite (a start costs seconds), so every scenario that uses it must leave it whole and idle."""
    from tests.support.tiny_models import SERVING_TINY

    with LocalCluster(str(tiny_model_factory(SERVING_TINY)), prefill=1, decode=2) as c:
        yield c
