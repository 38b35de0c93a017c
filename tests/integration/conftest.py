"""Integration tier: each test module gets its own local Ray cluster on loopback, started and stopped here."""

import pytest


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
             include_dashboard=True, logging_level="warning")  # fmt: skip
    yield
    ray.shutdown()

