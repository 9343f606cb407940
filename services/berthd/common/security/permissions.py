"""Who may call what: one table from every RPC of every berth service to the permission it
needs, and the permissions of each role and identity.

The one interceptor (berthd.common.interceptor) enforces it before any handler runs, against the
call's principal (berthd.common.security.principal); tests/unit/test_permissions.py walks every
service descriptor and fails on an RPC with no entry. docs/security.md explains the model.
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
    # Create, list and revoke tokens; see and rotate the join token.
    TOKEN_MANAGE = "token:manage"
    # Renew one's own node certificate (node agents).
    CERTIFICATE_RENEW = "certificate:renew"
    # List secrets (names and metadata, never values).
    SECRET_READ = "secret:read"
    # Create and remove secrets.
    SECRET_WRITE = "secret:write"
    # Receive the values of the secrets of containers placed on oneself (node agents; the
    # cluster checks the container is on the calling node).
    SECRET_DELIVER = "secret:deliver"
    # See networks.
    NETWORK_READ = "network:read"
    # Create and remove networks.
    NETWORK_WRITE = "network:write"


# Permissions that can be limited to repositories (a token's `--repo team/*`).
REPOSITORY_PERMISSIONS = frozenset(
    {Permission.REPOSITORY_PULL, Permission.REPOSITORY_PUSH, Permission.REPOSITORY_DELETE}
)


# Rule.repository for calls whose repository is their upload session's: the registry checks it
# when it finds the session.
UPLOAD = "upload"


@dataclass(frozen=True)
class Rule:
    """What one RPC needs: `permission`, and when `repository` names a request field (a dotted
    path; a repeated field names several) the repository permission `scope` (default: the
    permission itself) on each repository named there. `reference` says the field holds image
    references (`[host/]name[:tag]`) rather than repository names; references that name no
    repository (an image id or digest) are not scoped. A rule without `repository` on a
    repository permission is a listing: the handler shows only what the caller may pull.
    `mutates` marks calls recorded with their principal."""

    permission: Permission
    repository: str = ""
    mutates: bool = False
    scope: Permission | None = None
    reference: bool = False

    @property
    def repository_permission(self) -> Permission | None:
        if self.scope is not None:
            return self.scope
        return self.permission if self.permission in REPOSITORY_PERMISSIONS else None


P = Permission


def _rules(service: str, table: dict[str, Rule]) -> dict[str, Rule]:
    return {f"/{service}/{method}": rule for method, rule in table.items()}


def _read(permission: Permission, repository: str = "", scope: Permission | None = None) -> Rule:
    return Rule(permission, repository, scope=scope, reference=scope is not None)


def _write(permission: Permission, repository: str = "", scope: Permission | None = None) -> Rule:
    return Rule(permission, repository, mutates=True, scope=scope, reference=scope is not None)


REGISTRY = _rules(
    "berth.registry.v1.RegistryService",
    {
        "StartUpload": _write(P.REPOSITORY_PUSH, "repository"),
        "WriteUpload": _write(P.REPOSITORY_PUSH, UPLOAD),
        "GetUpload": _read(P.REPOSITORY_PUSH, UPLOAD),
        "CommitUpload": _write(P.REPOSITORY_PUSH, UPLOAD),
        "CancelUpload": _write(P.REPOSITORY_PUSH, UPLOAD),
        "StatBlob": _read(P.REPOSITORY_PULL, "repository"),
        "ReadBlob": _read(P.REPOSITORY_PULL, "repository"),
        # Mounting also reads from_repository: checked as a pull there.
        "MountBlob": _write(P.REPOSITORY_PUSH, "repository"),
        "PutManifest": _write(P.REPOSITORY_PUSH, "repository"),
        "GetManifest": _read(P.REPOSITORY_PULL, "repository"),
        # Many repositories: what the caller may not pull is reported not found, not refused.
        "BatchGetManifests": _read(P.REPOSITORY_PULL),
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

# A webhook sends the names and digests of every repository it matches, private ones too, to
# a URL of its maker's choosing (and makes the registry call that URL): registry admins only.
WEBHOOK = _rules(
    "berth.registry.v1.WebhookService",
    {
        "CreateWebhook": _write(P.REGISTRY_ADMIN),
        "ListWebhooks": _read(P.REGISTRY_ADMIN),
        "DeleteWebhook": _write(P.REGISTRY_ADMIN),
        "ListWebhookDeliveries": _read(P.REGISTRY_ADMIN),
    },
)

IMAGE = _rules(
    "berth.image.v1.ImageService",
    {
        "ListImages": _read(P.IMAGE_READ),
        "GetImage": _read(P.IMAGE_READ),
        "GetImageHistory": _read(P.IMAGE_READ),
        # The image service acts on berth's registry as service:image, so the caller's
        # repository scope is checked here, on the references the request names.
        "TagImage": _write(P.IMAGE_WRITE, "target", P.REPOSITORY_PUSH),
        "RemoveImage": _write(P.IMAGE_WRITE, "image", P.REPOSITORY_DELETE),
        "PruneImages": _write(P.IMAGE_WRITE),
        "CommitContainer": _write(P.IMAGE_WRITE, "reference", P.REPOSITORY_PUSH),
        "ImportImage": _write(P.IMAGE_WRITE),
        "SaveImages": _read(P.IMAGE_READ, "images", P.REPOSITORY_PULL),
        "LoadImages": _write(P.IMAGE_WRITE),
        "PullImage": _write(P.IMAGE_WRITE, "local_reference", P.REPOSITORY_PUSH),
        "PushImage": _write(P.IMAGE_WRITE, "image", P.REPOSITORY_PULL),
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
        "BatchContainerStats": _read(P.CONTAINER_READ),
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

# Users' tokens, served by the cluster (berth.cluster.v1.AccessService).
ACCESS = _rules(
    "berth.cluster.v1.AccessService",
    {
        "CreateToken": _write(P.TOKEN_MANAGE),
        "ListTokens": _read(P.TOKEN_MANAGE),
        "DeleteToken": _write(P.TOKEN_MANAGE),
        # Who the caller is: any caller, anonymous included (`berth login` checks a token).
        "GetIdentity": _read(P.PUBLIC),
    },
)

# Nodes joining the cluster (berth.cluster.v1.JoinService).
JOIN = _rules(
    "berth.cluster.v1.JoinService",
    {
        "GetJoinToken": _read(P.TOKEN_MANAGE),
        "RotateJoinToken": _write(P.TOKEN_MANAGE),
        # The join token in the request is the credential: a new node has no certificate yet.
        "JoinNode": _write(P.PUBLIC),
        "RenewNodeCertificate": _write(P.CERTIFICATE_RENEW),
    },
)

# Secrets (berth.cluster.v1.SecretService): values go in, never out.
SECRETS = _rules(
    "berth.cluster.v1.SecretService",
    {
        "CreateSecret": _write(P.SECRET_WRITE),
        "ListSecrets": _read(P.SECRET_READ),
        "RemoveSecret": _write(P.SECRET_WRITE),
        "GetContainerSecrets": _read(P.SECRET_DELIVER),
    },
)

# Networks (berth.cluster.v1.NetworkService).
NETWORKS = _rules(
    "berth.cluster.v1.NetworkService",
    {
        "CreateNetwork": _write(P.NETWORK_WRITE),
        "GetNetwork": _read(P.NETWORK_READ),
        "ListNetworks": _read(P.NETWORK_READ),
        "RemoveNetwork": _write(P.NETWORK_WRITE),
    },
)

# Every call on a node agent: only berth's own services (and admins) talk to it.
NODE = _rules(
    "berth.node.v1.NodeService",
    {
        method: Rule(P.NODE_AGENT, mutates=not method.startswith(("Get", "List", "Batch")))
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
            "BatchContainerStats",
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

METHODS: dict[str, Rule] = {
    **REGISTRY,
    **WEBHOOK,
    **IMAGE,
    **BUILDER,
    **CLUSTER,
    **ACCESS,
    **JOIN,
    **SECRETS,
    **NETWORKS,
    **NODE,
    **STANDARD,
}


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
        P.SECRET_READ,
        P.NETWORK_READ,
    }
)

ROLES: dict[Role, frozenset[Permission]] = {
    Role.READER: _READ,
    # Push and pull the repositories granted, build, run containers (without host access).
    Role.DEVELOPER: _READ
    | {P.REPOSITORY_PUSH, P.IMAGE_WRITE, P.BUILD, P.CONTAINER_WRITE, P.SERVICE_WRITE}
    | {P.SECRET_WRITE, P.NETWORK_WRITE},
    # Run the cluster: nodes, services, containers; no tokens, no registry deletions.
    Role.OPERATOR: _READ
    | {P.CONTAINER_WRITE, P.SERVICE_WRITE, P.NODE_MANAGE, P.IMAGE_WRITE, P.REGISTRY_ADMIN}
    | {P.SECRET_WRITE, P.NETWORK_WRITE},
    Role.ADMIN: frozenset(Permission),
}

# What berth's own identities (their certificates' names) may do. A node agent pulls images and
# pushes a committed container's layer; nothing else: it cannot create tokens or call other
# nodes. Services call each other for their own work.
IDENTITIES: dict[str, frozenset[Permission]] = {
    "node": frozenset(
        {P.PUBLIC, P.REPOSITORY_PULL, P.REPOSITORY_PUSH, P.CERTIFICATE_RENEW, P.SECRET_DELIVER}
    ),
    "service:registry": frozenset({P.PUBLIC}),
    "service:image": _READ | {P.REPOSITORY_PUSH, P.REPOSITORY_DELETE, P.NODE_AGENT},
    # The builder runs RUN steps in containers on a node agent, and reads their changes.
    "service:builder": _READ | {P.REPOSITORY_PUSH, P.CONTAINER_WRITE, P.NODE_AGENT},
    # The cluster passes admitted specs on to node agents (host access was checked for the
    # user who asked: the node checks the admission stamp, see docs/security.md).
    "service:cluster": _READ | {P.NODE_AGENT, P.HOST_ACCESS},
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
