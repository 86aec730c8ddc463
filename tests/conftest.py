# Fixture modules, one per area, so each area's fixtures live next to the code that owns them.
pytest_plugins = ["tests.fixtures_training", "tests.fixtures_export"]
