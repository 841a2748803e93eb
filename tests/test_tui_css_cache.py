"""The cache of Textual's parsed stylesheets (tui/css_cache.py, issue 17): a second start parses no
CSS and renders the same screen; a changed stylesheet, other variables, a damaged, foreign or
forged file, or a Textual whose method is not the one expected all fall back to parsing."""

from __future__ import annotations

import asyncio
import os
import pickle
import zlib

import pytest
from greend.tui import css_cache
from greend.tui.app import GreendApp
from greend.tui.data import LedgerSource
from test_tui_fixtures import NOW, build_ledger, config
from textual.css import stylesheet as textual_stylesheet
from textual.css.stylesheet import Stylesheet

CSS = "#x { height: 1; background: $primary; }\nStatic.y { color: red; text-style: bold; }\n"


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    css_cache.uninstall()
    yield tmp_path / "cache" / "greend"
    css_cache.uninstall()


@pytest.fixture
def parses(monkeypatch):
    """Counts Textual's own CSS parses (textual.css.parse.parse, as the stylesheet calls it)."""
    calls = []
    real = textual_stylesheet.parse

    def parse(*args, **kwargs):
        calls.append(args[1])  # the CSS text
        return real(*args, **kwargs)

    monkeypatch.setattr(textual_stylesheet, "parse", parse)
    return calls


def restart() -> css_cache.Cache:
    """What a new `greend tui` process does: install the wrapper, loading the file."""
    css_cache.uninstall()
    cache = css_cache.install()
    assert cache is not None
    return cache


def rules_of(css: str, variables: dict | None = None) -> list:
    sheet = Stylesheet(variables=variables or {"primary": "#004578"})
    sheet.add_source(css, read_from=("/somewhere/app.tcss", ""))
    sheet.parse()
    return sheet.rules


def the_file(cache_home):
    files = list(cache_home.glob("tcss-*.cache"))
    assert len(files) == 1, files
    return files[0]


def test_a_second_start_parses_nothing_and_gets_the_same_rules(cache_home, parses):
    restart()
    first = rules_of(CSS)
    assert parses == [CSS]
    assert css_cache.save()
    assert oct(the_file(cache_home).stat().st_mode & 0o777) == "0o600"

    cache = restart()
    again = rules_of(CSS)
    assert parses == [CSS]  # not parsed again
    assert (cache.hits, cache.misses) == (1, 0)
    assert [r.css for r in again] == [r.css for r in first]
    assert [str(r.selector_set) for r in again] == [str(r.selector_set) for r in first]
    assert not css_cache.save()  # nothing new to write


def test_other_css_or_other_variables_are_parsed_again(cache_home, parses):
    restart()
    rules_of(CSS)
    css_cache.save()
    restart()
    changed = CSS.replace("red", "blue")
    assert "#0000FF" in rules_of(changed)[1].css.upper()
    other_theme = rules_of(CSS, {"primary": "#ff0000"})
    assert "#FF0000" in other_theme[0].css.upper()
    assert parses == [CSS, changed, CSS]


def test_css_with_errors_is_never_stored(cache_home):
    restart()
    with pytest.raises(Exception):  # noqa: B017 - Textual's own parse error, as without the cache
        rules_of("#x { height: nonsense; }")
    assert not css_cache.save()


@pytest.mark.parametrize("damage", ["flip", "truncate", "mode", "empty"])
def test_a_damaged_or_foreign_file_is_a_miss(cache_home, parses, damage):
    restart()
    rules_of(CSS)
    css_cache.save()
    f = the_file(cache_home)
    data = f.read_bytes()
    if damage == "flip":
        f.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    elif damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "mode":
        f.chmod(0o644)  # another user could have written it
    else:
        f.write_bytes(b"")
    cache = restart()
    assert rules_of(CSS)[0].css  # parsed as usual, no error
    assert cache.misses == 1 and len(parses) == 2


def test_a_forged_entry_cannot_run_code(cache_home, tmp_path, parses):
    # Someone who could write the user's own cache file (and fix its CRC) puts a pickle there that
    # would run a command: it is refused, the CSS parsed as usual, and nothing runs.
    restart()
    rules_of(CSS)
    css_cache.save()
    f = the_file(cache_home)
    body = css_cache.usercache.read(f, css_cache.MAGIC)
    key, entries = css_cache.marshal.loads(body)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for stored in entries.values():
        for e in stored:
            e[2] = pickle.dumps(Evil())
    forged = css_cache.marshal.dumps((key, entries))
    f.write_bytes(css_cache.MAGIC + zlib.crc32(forged).to_bytes(4, "big") + forged)
    cache = restart()
    assert rules_of(CSS)[0].css
    assert not marker.exists()
    assert cache.misses == 1 and len(parses) == 2


def test_the_allow_list_takes_what_parsed_css_is_made_of_and_nothing_else():
    u = css_cache._Unpickler
    assert u.find_class(u.__new__(u), "textual.css.model", "RuleSet").__name__ == "RuleSet"
    for module, name in [("os", "system"), ("builtins", "eval"), ("subprocess", "Popen"),
                         ("textual.app", "os"), ("textual.css.stylesheet", "parse"),
                         ("textual.css.model", "__builtins__")]:
        with pytest.raises(pickle.UnpicklingError):
            u.find_class(u.__new__(u), module, name)
    with pytest.raises(pickle.UnpicklingError):
        css_cache._getattr(os, "system")
    with pytest.raises(pickle.UnpicklingError):
        css_cache._getattr({}, "clear")


def test_an_unexpected_textual_method_is_left_alone(cache_home, monkeypatch):
    def _parse_rules(self, css, origin):  # a Textual whose method changed
        return []

    monkeypatch.setattr(Stylesheet, "_parse_rules", _parse_rules)
    assert css_cache.install() is None
    assert Stylesheet._parse_rules is _parse_rules


def test_an_unusable_cache_location_is_no_error(tmp_path, monkeypatch, parses):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    css_cache.uninstall()
    try:
        assert css_cache.install() is not None
        assert rules_of(CSS)[0].css
        assert not css_cache.save()  # nothing written, nothing raised
    finally:
        css_cache.uninstall()


def test_the_jobs_screen_renders_the_same_from_the_cache(cache_home, tmp_path, parses):
    ledger = build_ledger(tmp_path / "ledger.sqlite")

    async def screenshot() -> str:
        app = GreendApp(LedgerSource(ledger, config()), user="alice", me="alice",
                        clock=lambda: NOW, refresh_s=0)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            await app.workers.wait_for_complete()
            await pilot.pause()
            return app.export_screenshot()

    restart()
    parsed = asyncio.run(screenshot())
    assert parses  # the app's, the screen's and every widget's CSS
    css_cache.save()
    n = len(parses)
    cache = restart()
    cached = asyncio.run(screenshot())
    assert len(parses) == n and cache.misses == 0 and cache.hits >= 10
    assert cached == parsed
