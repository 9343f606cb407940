"""OCI image-spec and distribution-spec helpers: digests, references, media types, manifests."""
