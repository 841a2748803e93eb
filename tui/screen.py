"""What every data screen shares: it reads from the app's source in a worker thread and shows a
failure in its status line with a retry hint, never as a traceback."""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual.screen import Screen
from textual.widgets import Static
from textual.worker import get_current_worker

from .formatting import clock


class SourceScreen(Screen):
    error: str | None = None
    loaded_at: float | None = None
    """When the data on screen was loaded (None: never); a failure then says the data is stale."""

    def load_in_worker(self, read: Callable, show: Callable) -> None:
        """From a worker thread: `read(source, now)` there, then `show(result)` on the UI thread."""
        worker = get_current_worker()
        app = self.app
        try:
            data = read(app.source, app.now())  # type: ignore[attr-defined]
        except Exception as e:  # shown in the app, never as a traceback
            msg = app.describe_error(e)  # type: ignore[attr-defined]
            if not worker.is_cancelled:
                app.call_from_thread(self._failed, msg)
            return
        if not worker.is_cancelled:
            app.call_from_thread(show, data)

    def _failed(self, msg: str) -> None:
        self.error = msg
        status = self.query_one("#status", Static)
        status.add_class("error")
        stale = f" (showing data from {clock(self.loaded_at)})" if self.loaded_at else ""
        status.update(Text(f"⚠ {msg}{stale}. Press r to retry."))

    def refresh_every(self, at_least_s: float = 0.0) -> None:
        """Reload every app.refresh_s (no more often than at_least_s) while this screen is shown."""
        refresh_s = self.app.refresh_s  # type: ignore[attr-defined]
        if refresh_s > 0:
            self.set_interval(max(refresh_s, at_least_s), self._tick)

    def _tick(self) -> None:
        if self.is_current and not self.error:
            self.reload()
