"""The image service: the cluster's image catalog over berth's registry (list, inspect,
history, tag, remove, prune), commit and import, save and load, pull and push to external
OCI registries."""
