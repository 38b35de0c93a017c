"""Integration tier: each test module gets its own local Ray cluster on loopback, started and stopped here."""

import os

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from pipelines.common import start_local_ray

    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    start_local_ray(num_cpus=2, logging_level="warning")  # its own dashboard address, whatever else runs here
    yield
    ray.shutdown()
    if before is None:
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    else:
        os.environ["RAY_API_SERVER_ADDRESS"] = before
