"""The one internal client layer: how a berth service calls another, asyncio end to end.

One channel per address (`channels`), deadlines, retries of idempotent calls while a peer
cannot be reached, and status codes turned back into domain errors (`calls`); a typed API per
service (`registry`, `cluster`, `node`; `secrets`: a node's GetContainerSecrets).
"""
