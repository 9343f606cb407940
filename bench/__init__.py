"""berth's benchmarks against peers (`make bench`; see docs/benchmarks.md).

Run each from the repository root as a module: `.venv/bin/python -m bench.registry` (also
`bench.node`, `bench.cluster`, `bench.image`, `bench.builder`, `bench.security`). They import
the image and docker-registry helpers from `scripts/` as `scripts.oci_images` and
`scripts.docker_registry`.
"""
