"""The `berth` command-line interface; the entry point is berth.cli.main:main."""
