"""Per-layer transfer lines in Docker's style.

On a terminal each layer is a live rich progress line (`3f4d90098f5b: Pushing [===>  ] 1.2MB/4.5MB`)
that ends as its final status (`Pushed`, `Layer already exists`, ...). Piped output gets one
line per layer when it finishes, so logs stay readable.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress, ProgressColumn, Task, TaskID
from rich.table import Column
from rich.text import Text

from berth.cli.output import human_size, short_digest

BAR_WIDTH = 50


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

    def finish(self, status: str) -> None:
        self._display.set(self._task, active=False, status=status)
        self._display.announce(self.digest, status)


class LayerProgress:
    """The set of layer lines of one push or pull; use as a context manager."""

    def __init__(self, out: Console, verb: str) -> None:
        self._console = out
        self._progress = (
            Progress(_DockerColumn(verb, out), console=out, refresh_per_second=8)
            if out.is_terminal
            else None
        )

    def __enter__(self) -> LayerProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()

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
