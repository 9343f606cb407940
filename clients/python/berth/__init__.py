"""berth: Python client and CLI for the berth container platform."""

# The package's version, as in pyproject.toml (tests/unit/test_cli_startup.py checks that they
# agree): `berth --version` reads it here, not through importlib.metadata (a scan of the
# installed distributions that costs more than the rest of the command).
__version__ = "0.1.0"
