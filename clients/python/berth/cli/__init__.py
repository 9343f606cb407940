"""The `berth` command-line interface; the entry point is berth.cli.main:main."""

import os

# gRPC's C core logs a failed TLS handshake at INFO on stderr; the CLI prints its own one-line
# error instead (berth.errors). Set before grpc is first imported; GRPC_VERBOSITY still wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
