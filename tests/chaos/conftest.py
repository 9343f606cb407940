"""The chaos test runs with the integration tests' session CA (BERTH_TLS_* for every process)."""

from tests.integration.conftest import cluster_ca  # noqa: F401 - the autouse session fixture
