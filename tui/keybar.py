"""The title line at the top of every screen and the line of keys at the bottom, each one Static.

Textual's Footer makes a widget per key and its Header three widgets; on `greend tui`'s first
screen they took about 100 ms of the start (the styles of a dozen widgets), more than the first
query and the table together. These draw the same as one line of text each.
"""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.widgets import Static


class TitleBar(Static):
    """'greend — My jobs · ledger /var/lib/greend/ledger.sqlite', following the app's sub-title."""

    DEFAULT_CSS = """
    TitleBar {
        dock: top;
        height: 1;
        width: 100%;
        background: $panel;
        color: $foreground;
        text-align: center;
    }
    """

    def on_mount(self) -> None:
        self.watch(self.app, "sub_title", self._show)

    def _show(self, sub_title: str) -> None:
        title = self.app.title + (f" — {sub_title}" if sub_title else "")
        self.update(Text(title, no_wrap=True, overflow="ellipsis"))


class KeyBar(Static):
    """The shown bindings (show=True) of the screen and the app, screen first, as 'key Action'."""

    DEFAULT_CSS = """
    KeyBar {
        dock: bottom;
        height: 1;
        background: $footer-background;
        color: $footer-foreground;
    }
    """

    def on_mount(self) -> None:
        self.update(self.line())

    def line(self) -> Text:
        app, screen = self.app, self.screen
        text = Text(no_wrap=True, overflow="crop")
        seen: set[str] = set()
        taken: set[str] = set()  # keys the screen binds: the app's binding of the same key is not live
        for node in (screen, app):
            bindings = list(Binding.make_bindings(type(node).BINDINGS))
            for binding in bindings:
                if not binding.show or binding.description in seen or binding.key in taken:
                    continue
                seen.add(binding.description)
                text.append(f" {app.get_key_display(binding)}", style="bold")
                text.append(f" {binding.description} ")
            taken |= {b.key for b in bindings}
        return text
