"""berth: Python client and CLI for the berth container platform."""
