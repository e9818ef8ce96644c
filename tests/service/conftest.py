"""Fixtures of the service tests; the helpers they use live in service_helpers (importable by name)."""

from tests.service.service_helpers import bentoml_home, patient, server_factory, small_export

__all__ = ["bentoml_home", "patient", "server_factory", "small_export"]
