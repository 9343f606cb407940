"""A node agent converging on the cluster's desired state.

The cluster service writes `cluster/containers/<id>` records naming a node, with the node's
assignment key `cluster/assignments/<node>/<id>` in the same transaction; the agent of that node
watches only its own assignment keys, reads the records they name and makes its containers
match (before the cluster's leader marked the index ready, it watches every record): pull the
image and create the container with the cluster's id, start it, stop it, remove it when the
record goes. An agent that comes back after being declared dead removes the cluster
containers no longer assigned to it, so a rescheduled replica never runs twice.

A container the node cannot create (its image is missing or does not pull, its spec is refused,
its spec needs host access and its record carries no admission stamp: HOST_ACCESS_DENIED, see
berthd.common.security.admission) gets the status CREATE_FAILED with the reason, once: the node
does not try it again until the record's `attempt` goes up (StartContainer, or the controller
for a service replica). Nor does it start again a container that exited on its own or failed
to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from berthd.common.errors import AlreadyExists, BerthError, InvalidArgument, NotFound
from berthd.common.security.admission import host_access
from berthd.common.state.containers import (
    ASSIGNMENTS_READY,
    CONTAINERS,
    CREATE_FAILED,
    CREATE_FAILED_REASON,
    HOST_ACCESS_DENIED,
    IMAGE_NOT_FOUND,
    IMAGE_PULL_FAILED,
    INVALID_SPEC,
    MANAGED_LABEL,
    RUNNING,
    SECRET_UNAVAILABLE,
    SERVICE_LABEL,
    STATUSES,
    STOPPED,
    ContainerStatus,
    DesiredContainer,
    assigned_id,
    assignments_of,
)
from berthd.common.store import Store
from berthd.node.containers import ContainerManager
from berthd.node.records import EXITED, RESTARTING
from berthd.node.records import RUNNING as STATE_RUNNING

log = logging.getLogger("berthd.node.converge")

RETRY_SECONDS = 2.0
# Desired records read at once when the agent (re)reads its assignments.
READ_BATCH = 64

# Pulls the image onto the node (the agent's pull, with its metrics).
Pull = Callable[[str], Awaitable[object]]


class CreateFailure(Exception):
    """Why the node cannot create a container: a ContainerFailure reason and a message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def check_admitted(desired: DesiredContainer) -> None:
    """Defence in depth: the cluster admits host access and stamps the record; a record that
    needs it without a stamp was written by something else, and is not created."""
    try:
        reasons = host_access(desired.config)
    except InvalidArgument as exc:
        raise CreateFailure(INVALID_SPEC, str(exc)) from None
    if reasons and not desired.host_access_by:
        what = ", ".join(r.description for r in reasons)
        raise CreateFailure(
            HOST_ACCESS_DENIED,
            f"its spec needs host access ({what}) and the cluster did not admit it "
            "(the record has no host_access_by)",
        )


class Converger:
    def __init__(self, store: Store, node_id: str, manager: ContainerManager, pull: Pull) -> None:
        self.store = store
        self.node_id = node_id
        self.manager = manager
        self.pull = pull
        self.desired: dict[str, DesiredContainer] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        # Containers whose status says why they could not be created, with the status as
        # written: no record owns it, so this converger deletes it (if it is still ours) once
        # the container is no longer assigned here. Not tried again before the record's
        # attempt goes above the status's.
        self._failed: dict[str, ContainerStatus] = {}
        # Set by the fence (berthd.node.fence) while the node is cut off: nothing is started.
        self.fenced = False
        # What the agent follows: "assignments" (its own keys), "all" (every record, until
        # the cluster's index is ready), "" before its first snapshot.
        self.following = ""

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def resynchronize(self) -> None:
        """Follow the desired state from a fresh snapshot (the old watch may be stale or on a
        dead connection): the first reconcile after it acts on what etcd holds now."""
        await self.stop()
        await self.start()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        """Snapshot, reconcile, then follow the watch; start over if the watch breaks."""
        while True:
            try:
                ready, revision = await self.store.get_at(ASSIGNMENTS_READY)
                if ready is not None:
                    await self._follow_assignments()
                else:
                    await self._follow_all(revision)
                    continue  # the index is ready: follow it from now on
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd away, watch compacted: resynchronize
                log.warning("desired-state watch failed, resynchronizing: %s", exc)
            await asyncio.sleep(RETRY_SECONDS)

    async def _follow_assignments(self) -> None:
        """Follow the node's own assignment keys (`cluster/assignments/<node>/<id>`, put in the
        transaction of every write of a record naming the node): each change of one is a
        point read of that record. Writes of other nodes' records never reach this agent."""
        prefix = assignments_of(self.node_id)
        entries, revision = await self.store.snapshot(prefix)
        ids = [cid for e in entries if (cid := assigned_id(self.node_id, e.key)) is not None]
        self.desired = {}
        for start in range(0, len(ids), READ_BATCH):
            chunk = ids[start : start + READ_BATCH]
            found = await asyncio.gather(*(CONTAINERS.get(self.store, cid) for cid in chunk))
            for cid, desired in zip(chunk, found, strict=True):
                self._record(cid, desired)
        self.following = "assignments"
        retry = asyncio.create_task(self._reconcile_loop())
        try:
            async for event in self.store.watch_prefix(prefix, revision + 1):
                cid = assigned_id(self.node_id, event.key)
                if cid is None:
                    continue
                # Read now, not at the event's revision: a later change brings its own event.
                desired = await CONTAINERS.get(self.store, cid) if event.kind == "put" else None
                self._record(cid, desired)
                self._wake.set()
        finally:
            retry.cancel()

    async def _follow_all(self, since: int) -> None:
        """Before the cluster completed the index (an upgraded cluster's leader backfills it):
        follow every desired record, until the ready marker appears after `since`."""
        records, revision = await CONTAINERS.snapshot(self.store)
        self.desired = {}
        for found in records:
            self._record(found.id, found.record)
        self.following = "all"

        async def follow() -> None:
            async for change in CONTAINERS.watch(self.store, revision + 1):
                self._record(change.id, change.record)
                self._wake.set()

        async def marker() -> None:
            async for event in self.store.watch_prefix(ASSIGNMENTS_READY, since + 1):
                if event.key == ASSIGNMENTS_READY and event.kind == "put":
                    return

        tasks = [
            asyncio.create_task(self._reconcile_loop()),
            asyncio.create_task(follow()),
            asyncio.create_task(marker()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a broken watch raises: resynchronize
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        log.info("the cluster's assignment index is ready: following this node's only")

    def _record(self, container_id: str, desired: DesiredContainer | None) -> None:
        """Follow one record (None: deleted); an unreadable one was skipped (and logged)."""
        if desired is not None and desired.node == self.node_id:
            self.desired[container_id] = desired
        else:
            self.desired.pop(container_id, None)

    async def _reconcile_loop(self) -> None:
        """Converge now, after every change, and every few seconds (to retry failures)."""
        while True:
            self._wake.clear()
            await self.reconcile()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation that
            # arrives as the event is set, and stop() would wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RETRY_SECONDS):
                    await self._wake.wait()

    async def reconcile(self) -> None:
        # Removals first: a replica replaced on this node (a rolling update, stop-first) leaves
        # its name to the new one, which could not be created while the old one is here.
        for record in list(self.manager.records.values()):
            managed = record.config.labels.get(MANAGED_LABEL)
            if managed and record.id not in self.desired:
                log.info(
                    "removing container no longer assigned here", extra={"container": record.id}
                )
                with contextlib.suppress(NotFound):
                    await self.manager.remove(record.id, force=True)
        for desired in list(self.desired.values()):
            try:
                await self._converge(desired)
            except CreateFailure as exc:
                log.warning(
                    "cannot create container: %s", exc.message, extra={"container": desired.id}
                )
                await self._report_failure(desired, exc)
            except BerthError as exc:
                log.warning("cannot converge container: %s", exc, extra={"container": desired.id})
            except Exception:  # one container's trouble must not stop the others'
                log.exception("cannot converge container %s", desired.id)
        await self._forget_failures()

    async def _report_failure(self, desired: DesiredContainer, exc: CreateFailure) -> None:
        """A container this node cannot create (its image does not pull, its user does not
        exist) has no record to report: say why in its status (CREATE_FAILED), so that whoever
        waits for it (a `berth run`, a build step) learns it now, not after a timeout. It is
        not tried again until its attempt goes up; a later success overwrites the status."""
        if desired.id in self.manager.records:
            return  # the record's own status (with its error) is reported by the manager
        status = ContainerStatus(
            node=self.node_id,
            name=desired.name,
            state=CREATE_FAILED,
            failure_reason=exc.reason,
            failure_message=exc.message,
            attempt=desired.attempt,
        )
        self._failed[desired.id] = status  # not tried again, even if the report fails
        try:
            await STATUSES.put(self.store, desired.id, status)
        except BerthError as failed:
            log.warning("cannot report it: %s", failed, extra={"container": desired.id})

    async def _forget_failures(self) -> None:
        """Failure statuses of containers that were created since (their record reports now)
        or are no longer assigned here (removed, or moved: nobody else would delete them)."""
        for container_id, status in list(self._failed.items()):
            if container_id in self.manager.records:
                del self._failed[container_id]
            elif container_id not in self.desired:
                # Only our own words: the node it moved to may have reported already.
                with contextlib.suppress(BerthError):
                    await self.store.txn(
                        [STATUSES.value_is(self.store, container_id, status)],
                        [STATUSES.op_delete(self.store, container_id)],
                    )
                    del self._failed[container_id]

    async def _failed_before(self, desired: DesiredContainer) -> bool:
        """Whether this node already failed to create the container at this attempt (known
        from this run, or from the status an earlier run of the agent wrote)."""
        failed = self._failed.get(desired.id)
        if failed is None:
            with contextlib.suppress(BerthError):
                status = await STATUSES.get(self.store, desired.id)
                if status is not None and status.create_failed and status.node == self.node_id:
                    self._failed[desired.id] = failed = status
        return failed is not None and failed.attempt >= desired.attempt

    async def _create(self, desired: DesiredContainer) -> None:
        """Pull the image if needed, create the container with the cluster's id; CreateFailure
        with the reason when it cannot be."""
        check_admitted(desired)
        desired.config.labels[MANAGED_LABEL] = "true"
        if desired.service:
            desired.config.labels[SERVICE_LABEL] = desired.service
        desired.config.name = desired.name
        image = desired.config.image
        try:
            self.manager.images.get(image)
        except NotFound:
            try:
                await self.pull(image)
            except NotFound as exc:
                raise CreateFailure(IMAGE_NOT_FOUND, f"cannot pull {image}: {exc}") from None
            except InvalidArgument as exc:
                raise CreateFailure(INVALID_SPEC, f"cannot pull {image}: {exc}") from None
            except Exception as exc:
                raise CreateFailure(IMAGE_PULL_FAILED, f"cannot pull {image}: {exc}") from None
        except InvalidArgument as exc:
            raise CreateFailure(INVALID_SPEC, str(exc)) from None
        try:
            record = await self.manager.create(desired.config, container_id=desired.id)
        except AlreadyExists as exc:
            holder = next(
                (r for r in self.manager.records.values() if r.name == desired.name), None
            )
            if holder is not None and holder.config.labels.get(MANAGED_LABEL):
                raise  # a cluster container on its way out (removed above next pass): retried
            raise CreateFailure(CREATE_FAILED_REASON, str(exc)) from None
        except InvalidArgument as exc:
            raise CreateFailure(INVALID_SPEC, str(exc)) from None
        except Exception as exc:
            # The cluster did not give the container's secrets: SECRET_UNAVAILABLE.
            secret = isinstance(exc, BerthError) and exc.reason == SECRET_UNAVAILABLE
            reason = SECRET_UNAVAILABLE if secret else CREATE_FAILED_REASON
            raise CreateFailure(reason, str(exc)) from None
        record.attempt = desired.attempt

    async def _converge(self, desired: DesiredContainer) -> None:
        record = self.manager.records.get(desired.id)
        if self.fenced:
            # Cut off: the cluster may run this container elsewhere by now. Stops only.
            if (
                desired.desired == STOPPED
                and record is not None
                and record.state
                in (
                    STATE_RUNNING,
                    RESTARTING,
                )
            ):
                await self.manager.stop(record.id, desired.stop_grace)
            return
        if record is None:
            if desired.desired != RUNNING or await self._failed_before(desired):
                return
            await self._create(desired)
            await self.manager.start(desired.id)  # a failure is in the record's status
            return
        if desired.withdrawn_at and not record.withdrawn:
            await self.manager.withdraw(record.id)
        if desired.desired == STOPPED and record.state in (STATE_RUNNING, RESTARTING):
            await self.manager.stop(record.id, desired.stop_grace)
        elif desired.desired != RUNNING:
            return
        elif record.state == "created" or (
            record.state == EXITED and (record.stopped_by_user or desired.attempt > record.attempt)
        ):
            # Created and never started (the agent stopped in between), started again through
            # the cluster after a stop, or StartContainer on one that exited or failed to start.
            record.attempt = desired.attempt
            await self.manager.start(record.id)
