"""Who may call what: one table from every RPC of every berth service to the permission it
needs, and the permissions of each role and identity.

This is the security issue's authorization model, written first as data so it can be reviewed
and tested on its own (tests/unit/test_permissions.py walks every service descriptor and fails
on an RPC with no entry). The interceptor that enforces it, the identities it is checked
against (certificates, tokens) and repository visibility come with the rest of that issue.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Permission(StrEnum):
    """What a caller may do. `repository:*` permissions can be limited to repository patterns
    (a token for `team/*`); the others hold cluster-wide."""

    # Anyone, with or without a credential (health checks).
    PUBLIC = "public"
    # Read a repository's blobs, manifests and tags; see it in listings and search.
    REPOSITORY_PULL = "repository:pull"
    # Upload blobs and manifests, tag, mount into a repository.
    REPOSITORY_PUSH = "repository:push"
    # Delete manifests and tags; change a repository's description, labels and visibility.
    REPOSITORY_DELETE = "repository:delete"
    # Registry-wide maintenance: garbage collection.
    REGISTRY_ADMIN = "registry:admin"
    # The image catalog: list, inspect, history, save.
    IMAGE_READ = "image:read"
    # Change the catalog: tag, remove, prune, commit, import, load, pull and push externally.
    IMAGE_WRITE = "image:write"
    # Build images, read and prune the build cache.
    BUILD = "build"
    # See containers: list, inspect, logs, stats, wait, events.
    CONTAINER_READ = "container:read"
    # Run, stop, start, remove containers; exec into them and attach to them.
    CONTAINER_WRITE = "container:write"
    # See services and their replicas.
    SERVICE_READ = "service:read"
    # Create, scale, update and remove services.
    SERVICE_WRITE = "service:write"
    # See nodes, endpoints and events.
    CLUSTER_READ = "cluster:read"
    # Cordon, drain and activate nodes.
    NODE_MANAGE = "node:manage"
    # Call a node agent directly. Only berth's services and admins: a container created on a
    # node behind the cluster's back would escape placement, admission and accounting.
    NODE_AGENT = "node:agent"
    # Host-level power in a container spec: host bind mounts, the host network, extra
    # capabilities, an unconfined seccomp profile (admission, checked by cluster and node).
    HOST_ACCESS = "host:access"
    # Create, list and revoke tokens; rotate join tokens.
    TOKEN_MANAGE = "token:manage"


@dataclass(frozen=True)
class Rule:
    """What one RPC needs. `repository` names the request field that holds the repository the
    call acts on, when the permission is a repository one and the request says which; `upload`
    means the repository is the upload session's."""

    permission: Permission
    repository: str = ""
    mutates: bool = False


P = Permission


def _rules(service: str, table: dict[str, Rule]) -> dict[str, Rule]:
    return {f"/{service}/{method}": rule for method, rule in table.items()}


def _read(permission: Permission, repository: str = "") -> Rule:
    return Rule(permission, repository)


def _write(permission: Permission, repository: str = "") -> Rule:
    return Rule(permission, repository, mutates=True)


REGISTRY = _rules(
    "berth.registry.v1.RegistryService",
    {
        "StartUpload": _write(P.REPOSITORY_PUSH, "repository"),
        "WriteUpload": _write(P.REPOSITORY_PUSH, "upload"),
        "GetUpload": _read(P.REPOSITORY_PUSH, "upload"),
        "CommitUpload": _write(P.REPOSITORY_PUSH, "upload"),
        "CancelUpload": _write(P.REPOSITORY_PUSH, "upload"),
        "StatBlob": _read(P.REPOSITORY_PULL, "repository"),
        "ReadBlob": _read(P.REPOSITORY_PULL, "repository"),
        # Mounting also reads from_repository: checked as a pull there.
        "MountBlob": _write(P.REPOSITORY_PUSH, "repository"),
        "PutManifest": _write(P.REPOSITORY_PUSH, "repository"),
        "GetManifest": _read(P.REPOSITORY_PULL, "repository"),
        "DeleteManifest": _write(P.REPOSITORY_DELETE, "repository"),
        # Listings show only what the caller may pull (filtered, not refused).
        "ListRepositories": _read(P.REPOSITORY_PULL),
        "GetRepository": _read(P.REPOSITORY_PULL, "repository"),
        "UpdateRepository": _write(P.REPOSITORY_DELETE, "repository"),
        "ListTags": _read(P.REPOSITORY_PULL, "repository"),
        "ListManifests": _read(P.REPOSITORY_PULL, "repository"),
        "DeleteTag": _write(P.REPOSITORY_DELETE, "repository"),
        "Search": _read(P.REPOSITORY_PULL),
        "GarbageCollect": _write(P.REGISTRY_ADMIN),
    },
)

IMAGE = _rules(
    "berth.image.v1.ImageService",
    {
        "ListImages": _read(P.IMAGE_READ),
        "GetImage": _read(P.IMAGE_READ),
        "GetImageHistory": _read(P.IMAGE_READ),
        "TagImage": _write(P.IMAGE_WRITE),
        "RemoveImage": _write(P.IMAGE_WRITE),
        "PruneImages": _write(P.IMAGE_WRITE),
        "CommitContainer": _write(P.IMAGE_WRITE),
        "ImportImage": _write(P.IMAGE_WRITE),
        "SaveImages": _read(P.IMAGE_READ),
        "LoadImages": _write(P.IMAGE_WRITE),
        "PullImage": _write(P.IMAGE_WRITE),
        "PushImage": _write(P.IMAGE_WRITE),
    },
)

BUILDER = _rules(
    "berth.builder.v1.BuilderService",
    {
        "Build": _write(P.BUILD),
        "ListCache": _read(P.BUILD),
        "PruneCache": _write(P.BUILD),
    },
)

CLUSTER = _rules(
    "berth.cluster.v1.ClusterService",
    {
        "ListNodes": _read(P.CLUSTER_READ),
        "GetNode": _read(P.CLUSTER_READ),
        "CordonNode": _write(P.NODE_MANAGE),
        "DrainNode": _write(P.NODE_MANAGE),
        "ActivateNode": _write(P.NODE_MANAGE),
        "RunContainer": _write(P.CONTAINER_WRITE),
        "ListContainers": _read(P.CONTAINER_READ),
        "GetContainer": _read(P.CONTAINER_READ),
        "StopContainer": _write(P.CONTAINER_WRITE),
        "StartContainer": _write(P.CONTAINER_WRITE),
        "RemoveContainer": _write(P.CONTAINER_WRITE),
        "WaitContainer": _read(P.CONTAINER_READ),
        "ContainerLogs": _read(P.CONTAINER_READ),
        "Exec": _write(P.CONTAINER_WRITE),
        "AttachContainer": _write(P.CONTAINER_WRITE),
        "ContainerStats": _read(P.CONTAINER_READ),
        "CreateService": _write(P.SERVICE_WRITE),
        "ListServices": _read(P.SERVICE_READ),
        "GetService": _read(P.SERVICE_READ),
        "ListServiceReplicas": _read(P.SERVICE_READ),
        "ScaleService": _write(P.SERVICE_WRITE),
        "UpdateService": _write(P.SERVICE_WRITE),
        "RemoveService": _write(P.SERVICE_WRITE),
        "GetEndpoints": _read(P.CLUSTER_READ),
        "Events": _read(P.CLUSTER_READ),
    },
)

# Every call on a node agent: only berth's own services (and admins) talk to it.
NODE = _rules(
    "berth.node.v1.NodeService",
    {
        method: Rule(P.NODE_AGENT, mutates=not method.startswith(("Get", "List")))
        for method in (
            "GetNode",
            "PullImage",
            "ListImages",
            "RemoveImage",
            "CreateContainer",
            "StartContainer",
            "StopContainer",
            "KillContainer",
            "RemoveContainer",
            "ListContainers",
            "GetContainer",
            "WaitContainer",
            "ContainerLogs",
            "Exec",
            "AttachContainer",
            "ContainerStats",
            "ContainerChanges",
            "ExportLayer",
        )
    },
)

# Health stays open, so supervisors and load balancers need no credential; reflection
# describes the API and needs one.
STANDARD = {
    "/grpc.health.v1.Health/Check": Rule(P.PUBLIC),
    "/grpc.health.v1.Health/List": Rule(P.PUBLIC),
    "/grpc.health.v1.Health/Watch": Rule(P.PUBLIC),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Rule(P.CLUSTER_READ),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Rule(P.CLUSTER_READ),
}

METHODS: dict[str, Rule] = {**REGISTRY, **IMAGE, **BUILDER, **CLUSTER, **NODE, **STANDARD}


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    DEVELOPER = "developer"
    READER = "reader"


_READ = frozenset(
    {
        P.PUBLIC,
        P.REPOSITORY_PULL,
        P.IMAGE_READ,
        P.CONTAINER_READ,
        P.SERVICE_READ,
        P.CLUSTER_READ,
    }
)

ROLES: dict[Role, frozenset[Permission]] = {
    Role.READER: _READ,
    # Push and pull the repositories granted, build, run containers (without host access).
    Role.DEVELOPER: _READ
    | {P.REPOSITORY_PUSH, P.IMAGE_WRITE, P.BUILD, P.CONTAINER_WRITE, P.SERVICE_WRITE},
    # Run the cluster: nodes, services, containers; no tokens, no registry deletions.
    Role.OPERATOR: _READ
    | {P.CONTAINER_WRITE, P.SERVICE_WRITE, P.NODE_MANAGE, P.IMAGE_WRITE, P.REGISTRY_ADMIN},
    Role.ADMIN: frozenset(Permission),
}

# What berth's own identities (their certificates' names) may do. A node agent pulls images and
# pushes a committed container's layer; nothing else: it cannot create tokens or call other
# nodes. Services call each other for their own work.
IDENTITIES: dict[str, frozenset[Permission]] = {
    "node": frozenset({P.PUBLIC, P.REPOSITORY_PULL, P.REPOSITORY_PUSH}),
    "service:registry": frozenset({P.PUBLIC}),
    "service:image": _READ | {P.REPOSITORY_PUSH, P.REPOSITORY_DELETE, P.NODE_AGENT},
    "service:builder": _READ | {P.REPOSITORY_PUSH, P.CONTAINER_WRITE},
    "service:cluster": _READ | {P.NODE_AGENT},
}


def permissions_of(roles: Iterable[Role]) -> frozenset[Permission]:
    granted: set[Permission] = set()
    for role in roles:
        granted |= ROLES[role]
    return frozenset(granted)


def rule_for(method: str) -> Rule | None:
    """The rule of a full method name ("/berth.registry.v1.RegistryService/StatBlob"); None for
    a method berth does not serve, which the interceptor refuses."""
    return METHODS.get(method)
