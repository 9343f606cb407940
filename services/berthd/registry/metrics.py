"""The registry's own Prometheus figures (per-RPC figures come from the common interceptor)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BYTES_RECEIVED = Counter(
    "berth_registry_received_bytes_total", "Blob bytes received in upload sessions."
)
BYTES_SENT = Counter(
    "berth_registry_sent_bytes_total", "Blob bytes sent by ReadBlob and HTTP blob GETs."
)
BLOBS_DEDUPLICATED = Counter(
    "berth_registry_blobs_deduplicated_total",
    "Uploads whose blob was already stored, so the new copy was discarded.",
)
BLOBS_SKIPPED = Counter(
    "berth_registry_blob_transfers_avoided_total",
    "Blob transfers a client skipped because the registry had the blob, by how it learned.",
    ["how"],
)
UPLOADS_IN_PROGRESS = Gauge(
    "berth_registry_uploads_in_progress", "Upload streams currently writing to this process."
)
HTTP_REQUESTS = Counter(
    "berth_registry_http_requests_total",
    "Requests to the OCI HTTP API, by method, endpoint and HTTP status.",
    ["method", "endpoint", "status"],
)
HTTP_LATENCY = Histogram(
    "berth_registry_http_request_duration_seconds",
    "Time from a request to the OCI HTTP API to its status, by method and endpoint.",
    ["method", "endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
GC_RUNS = Counter("berth_registry_gc_runs_total", "Garbage collections run, by mode.", ["mode"])
GC_FREED_BYTES = Counter("berth_registry_gc_freed_bytes_total", "Bytes deleted by GC.")
GC_DELETED_BLOBS = Counter("berth_registry_gc_deleted_blobs_total", "Blobs deleted by GC.")
