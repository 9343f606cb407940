"""Per-layer transfer lines in Docker's style.

On a terminal each layer is a live rich progress line (`3f4d90098f5b: Pushing [===>  ] 1.2MB/4.5MB`)
that ends as its final status (`Pushed`, `Layer already exists`, ...). Piped output gets one
line per layer when it finishes, so logs stay readable. A whole archive in transit (load, save,
import) is one such line without a digest, on terminals only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from rich.console import Console
from rich.progress import Progress, ProgressColumn, Task, TaskID
from rich.table import Column
from rich.text import Text

from berth.cli.output import human_size, short_digest

BAR_WIDTH = 50


class _Live:
    """A rich Progress shown live on a terminal, and nothing at all when `out` is not one; a
    context manager that starts and stops it."""

    def __init__(self, out: Console, column: ProgressColumn) -> None:
        self._progress = (
            Progress(column, console=out, refresh_per_second=8) if out.is_terminal else None
        )

    def __enter__(self) -> Self:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def docker_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """`[=====>     ]  12.3MB/45.6MB` like Docker; width 0 leaves only the byte counts."""
    counts = f"{human_size(done):>8}/{human_size(total)}"
    if width <= 0:
        return counts.strip()
    filled = min(width, width * done // total) if total > 0 else width
    return f"[{'=' * filled}>{' ' * (width - filled)}] {counts}"


class _DockerColumn(ProgressColumn):
    """Renders a whole line: the short digest, then the live bar or the final status."""

    def __init__(self, verb: str, out: Console) -> None:
        super().__init__(table_column=Column(no_wrap=True, overflow="ellipsis"))
        self._verb = verb
        self._console = out

    def render(self, task: Task) -> Text:
        prefix = f"{task.fields['short']}: "
        if not task.fields["active"]:
            return Text(prefix + task.fields["status"], no_wrap=True, overflow="ellipsis")
        # Shrink the bar to fit narrow terminals (the 19 columns hold brackets and byte counts),
        # and drop it when too little room is left, as Docker does.
        room = self._console.width - len(prefix) - len(self._verb) - 19
        width = min(BAR_WIDTH, room) if room >= 10 else 0
        bar = docker_bar(int(task.completed), int(task.total or 0), width)
        return Text(f"{prefix}{self._verb} {bar}", no_wrap=True, overflow="ellipsis")


class LayerLine:
    """One layer's line. `update` has the signature of the client's progress callback."""

    def __init__(self, display: LayerProgress, task: TaskID | None, digest: str) -> None:
        self._display = display
        self._task = task
        self.digest = digest

    def update(self, done: int, total: int) -> None:
        self._display.set(self._task, active=True, completed=done, total=total)

    def show(self, status: str) -> None:
        """A state between the transfer and the end (Verifying Checksum, Extracting ...), on the
        live line only: piped output prints just the final status."""
        self._display.set(self._task, active=False, status=status)

    def finish(self, status: str) -> None:
        self._display.set(self._task, active=False, status=status)
        self._display.announce(self.digest, status)


class LayerProgress(_Live):
    """The set of layer lines of one push or pull; use as a context manager."""

    def __init__(self, out: Console, verb: str) -> None:
        super().__init__(out, _DockerColumn(verb, out))
        self._console = out

    def add(self, digest: str, total: int) -> LayerLine:
        """A new line, shown as `Waiting` until the layer's transfer starts."""
        task = None
        if self._progress is not None:
            task = self._progress.add_task(
                "", total=total, short=short_digest(digest), status="Waiting", active=False
            )
        return LayerLine(self, task, digest)

    def set(self, task: TaskID | None, **fields: object) -> None:
        if self._progress is not None and task is not None:
            completed = fields.pop("completed", None)
            total = fields.pop("total", None)
            self._progress.update(task, completed=completed, total=total, **fields)

    def announce(self, digest: str, status: str) -> None:
        """Without live lines, a finished layer is printed once."""
        if self._progress is None:
            self._console.print(f"{short_digest(digest)}: {status}", markup=False)


@dataclass(frozen=True)
class Direction:
    """The Docker words of one transfer direction: the state of a blob on the move (the live
    bar's verb), and the final states, the first of which means bytes were copied."""

    moving: str
    final: tuple[str, ...]


PULL = Direction("Downloading", ("Pull complete", "Already exists"))
PUSH = Direction("Pushing", ("Pushed", "Layer already exists", "Mounted from another repository"))


class TransferDisplay:
    """Per-blob progress events (digest, state in Docker's words, bytes) as Docker's lines."""

    def __init__(self, display: LayerProgress, direction: Direction) -> None:
        self._display = display
        self._direction = direction
        self._lines: dict[str, LayerLine] = {}
        self.copied = False  # whether any blob had to be copied (else "up to date")

    def update(self, digest: str, state: str, current: int, total: int) -> None:
        if not digest:
            return
        line = self._lines.get(digest)
        if line is None:
            line = self._lines[digest] = self._display.add(digest, total)
        if state in (self._direction.moving, self._direction.final[0]):
            self.copied = True
        if state in self._direction.final or state.startswith("Mounted from "):
            line.finish(state)
        elif state == self._direction.moving:
            line.update(current, total)
        elif state == "Extracting" and total > 0:
            line.show(f"Extracting {docker_bar(current, total)}")
        else:
            line.show(state)


class _BytesColumn(ProgressColumn):
    """`Loading [=====>    ]  12.3MB/45.6MB`; only the count when the total is unknown."""

    def __init__(self, out: Console) -> None:
        super().__init__(table_column=Column(no_wrap=True, overflow="ellipsis"))
        self._console = out

    def render(self, task: Task) -> Text:
        done, total = int(task.completed), int(task.total or 0)
        if total <= 0:
            return Text(f"{task.description} {human_size(done)}", no_wrap=True)
        room = self._console.width - len(task.description) - 20
        bar = docker_bar(done, total, min(BAR_WIDTH, room) if room >= 10 else 0)
        return Text(f"{task.description} {bar}", no_wrap=True, overflow="ellipsis")


class ByteProgress(_Live):
    """One bar for a whole stream of bytes on a terminal; nothing when out is not one.
    `update` has the signature of the client's upload and download callbacks."""

    def __init__(self, out: Console, description: str) -> None:
        super().__init__(out, _BytesColumn(out))
        self._task: TaskID | None = (
            self._progress.add_task(description, total=None) if self._progress else None
        )

    def update(self, done: int, total: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total or None)


class _StageColumn(ProgressColumn):
    """`Sweeping blobs  1200/5000`, or `Marking manifests  1200` while the total is unknown."""

    def render(self, task: Task) -> Text:
        done, total = int(task.completed), int(task.total or 0)
        counts = f"{done}/{total}" if total > 0 else str(done)
        status = " done" if task.fields.get("finished") else ""
        return Text(f"{task.description} {counts}{status}", no_wrap=True, overflow="ellipsis")


class StageProgress(_Live):
    """One live line per stage of an operation that counts items (a garbage collection's mark
    and sweep, a load's images), on terminals only; nothing when out is not one. `labels`
    maps a stage id to its line's words ("sweep": "Sweeping blobs")."""

    def __init__(self, out: Console, labels: dict[str, str]) -> None:
        super().__init__(out, _StageColumn())
        self._labels = labels
        self._tasks: dict[str, TaskID] = {}

    def update(self, stage: str, current: int, total: int, done: bool) -> None:
        if self._progress is None:
            return
        task = self._tasks.get(stage)
        if task is None:
            label = self._labels.get(stage, stage)
            task = self._tasks[stage] = self._progress.add_task(label, total=None)
        self._progress.update(task, completed=current, total=total or None, finished=done)
