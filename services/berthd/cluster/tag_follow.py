"""Services that follow a tag: the policy in a service record, and resolving it to a digest.

A service with a follow policy runs `repo@sha256:...`, never a tag: CreateService and
UpdateService resolve the followed tag (or the highest tag matching a semver range) to the digest
it names now, so every replica runs the same bytes whatever is pushed while they start. The
registry's tag records are read from etcd through their typed module in berthd.common.state
(the registry is their one writer); nothing here imports the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from berth.reference import InvalidReference, parse_container_image
from berth.semver import InvalidRange, Range, parse_range
from berthd.common.errors import InvalidArgument, NotFound
from berthd.common.state.registry import TAGS, name_change, split_child_key, tag_key
from berthd.common.store import Store, prefix_end

TAG = "tag"
SEMVER = "semver"
# A followed tag or range that names no image now (NotFound).
FOLLOW_TAG_NOT_FOUND = "FOLLOW_TAG_NOT_FOUND"


@dataclass
class FollowSpec:
    """What a service follows (FollowPolicy): its template image's tag (`mode` "tag") or the
    highest tag of its repository in `semver`. `reference` is the `repo:tag` followed or
    picked, set at every resolution; on an update a non-empty one is followed instead of the
    template's image (which then names a digest)."""

    mode: str
    semver: str = ""
    reference: str = ""

    def range(self) -> Range:
        try:
            return parse_range(self.semver)
        except InvalidRange as exc:
            raise InvalidArgument(
                exc.message, reason="INVALID_SPEC", field="spec.follow.semver"
            ) from None


@dataclass(frozen=True)
class Resolved:
    """A follow policy's image now: `image` is `repo@digest`, `reference` `repo:tag`."""

    repository: str
    tag: str
    digest: str

    @property
    def image(self) -> str:
        return f"{self.repository}@{self.digest}"

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"


def followed(image: str, follow: FollowSpec) -> tuple[str, str]:
    """(repository, tag) a policy follows: its `reference` when set, else the template's image
    (`latest` when it names no tag; a semver policy uses its repository only)."""
    source = follow.reference or image
    try:
        ref = parse_container_image(source)
    except InvalidReference as exc:
        field = "spec.follow.reference" if follow.reference else "spec.template.image"
        raise InvalidArgument(exc.message, reason="INVALID_SPEC", field=field) from None
    if follow.mode == TAG and ref.tag is None:
        raise InvalidArgument(
            f"--follow follows a tag, and {source} names only a digest: give the tag to "
            "follow (repo:tag)",
            reason="INVALID_SPEC",
            field="spec.template.image",
        )
    return ref.repository, ref.tag or ""


async def tag_digest(store: Store, repository: str, tag: str) -> str | None:
    """The digest `repository:tag` names in berth's registry now; None when there is none."""
    entry = await store.get(tag_key(repository, tag))
    if entry is None:
        return None
    change = name_change(entry.key, entry.value)
    return change.value if change is not None and isinstance(change.value, str) else None


async def repository_tags(store: Store, repository: str) -> dict[str, str]:
    """Every readable tag of `repository` with its digest."""
    prefix = f"{TAGS}{repository}@"
    tags = {}
    async for entry in store.iterate_range(prefix, prefix_end(prefix)):
        change = name_change(entry.key, entry.value)
        if change is not None and isinstance(change.value, str):
            tags[split_child_key(entry.key, TAGS)[1]] = change.value
    return tags


async def resolve(store: Store, image: str, follow: FollowSpec) -> Resolved:
    """The image `follow` names now. InvalidArgument for a bad policy; NotFound
    (FOLLOW_TAG_NOT_FOUND) when the tag does not exist or no tag matches the range."""
    repository, tag = followed(image, follow)
    if follow.mode == TAG:
        digest = await tag_digest(store, repository, tag)
        if digest is None:
            raise NotFound(
                f"cannot follow {repository}:{tag}: no such tag in the registry (push it first)",
                reason=FOLLOW_TAG_NOT_FOUND,
                metadata={"repository": repository, "tag": tag},
            )
        return Resolved(repository, tag, digest)
    if follow.mode != SEMVER:
        raise InvalidArgument(
            f"unknown follow mode {follow.mode!r}", reason="INVALID_SPEC", field="spec.follow"
        )
    tags = await repository_tags(store, repository)
    picked = follow.range().pick(tags)
    if picked is None:
        raise NotFound(
            f"cannot follow {repository} semver:{follow.semver}: none of its {len(tags)} tags "
            "is a version in that range",
            reason=FOLLOW_TAG_NOT_FOUND,
            metadata={"repository": repository, "semver": follow.semver},
        )
    return Resolved(repository, picked[0], tags[picked[0]])


async def resolve_template(store: Store, record: object) -> None:
    """Pin a service record's template image to the digest its follow policy names now (no
    policy: nothing). `record` is a ServiceRecord (not imported: it imports this module)."""
    follow: FollowSpec | None = getattr(record, "follow", None)
    if follow is None:
        return
    template = record.template  # type: ignore[attr-defined]
    if follow.mode == SEMVER:
        follow.range()  # a bad range is refused before any read
    found = await resolve(store, template.image, follow)
    template.image, follow.reference = found.image, found.reference
