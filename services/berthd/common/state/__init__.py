"""Typed records in etcd that more than one service reads: one module per family group.

Each module holds its families' key layout, a dataclass per record with `encode`/`decode`
(unknown fields ignored, so a newer writer's records still read), and a `Family` (family.py)
per key family: the one key builder, reads by key, whole-family reads and a watch narrowed to
the family. Only a record's owning service writes it; docs/etcd.md lists every key family,
shared or private, with its owner, readers, value and the transactions that guard it.

    containers.py   cluster/containers/<id> (DesiredContainer), containers/<id>/status
    nodes.py        nodes/<id> (NodeRecord, lease-bound), cluster/node-layers/<id>
    endpoints.py    endpoints/<service>/<instance> (lease-bound)
    images.py       images/<digest> (ImageOrigin), builds/<digest> (BuildRecord)
    build_cache.py  build-cache/<key> (CacheRecord)
"""
