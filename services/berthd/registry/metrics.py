"""The registry's own Prometheus figures (per-RPC figures come from the common interceptor)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

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
GC_RUNS = Counter("berth_registry_gc_runs_total", "Garbage collections run, by mode.", ["mode"])
GC_FREED_BYTES = Counter("berth_registry_gc_freed_bytes_total", "Bytes deleted by GC.")
GC_DELETED_BLOBS = Counter("berth_registry_gc_deleted_blobs_total", "Blobs deleted by GC.")
