"""`python -m berth` runs the CLI."""

import sys

from berth.cli.main import main

sys.exit(main())
