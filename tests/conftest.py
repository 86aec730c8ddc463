# Fixture modules, one per area, so each area's fixtures live next to the code that owns them.
pytest_plugins = ["tests.fixtures_training", "tests.fixtures_export"]

# Servers built in tests (TestClient apps and live subprocesses) leave gRPC off unless a test asks for a port:
# the default port (8001) would collide between concurrent test runs.
import os  # noqa: E402

os.environ.setdefault("MMSERVE_GRPC_PORT", "0")
