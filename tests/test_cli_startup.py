"""Start-up of the `greend` command (issues 14 and 17): a command line builds only its own command's
parser, and that parser is the same as the one in the full parser."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from greend import cli


def _commands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_command_map_names_every_command_of_the_full_parser():
    assert set(_commands(cli.build_parser())) == set(cli.COMMAND_MODULES)


@pytest.mark.parametrize("command", sorted(cli.COMMAND_MODULES))
def test_a_command_alone_parses_and_explains_itself_as_in_the_full_parser(command):
    full = _commands(cli.build_parser())[command]
    alone = cli.build_parser(command)
    own = _commands(alone)
    assert command in own
    assert own[command].format_help() == full.format_help()
    if command in ("completion", "man"):  # they describe every command
        assert set(own) == set(cli.COMMAND_MODULES)
    else:
        assert {cli.COMMAND_MODULES[c] for c in own} == {cli.COMMAND_MODULES[command]}
    f_own, f_full = own[command].get_default("func"), full.get_default("func")
    assert getattr(f_own, "__qualname__", None) == getattr(f_full, "__qualname__", None)


@pytest.mark.parametrize(("argv", "command"), [
    (["measure", "--", "true"], "measure"),
    (["-c", "route", "jobs"], "jobs"),
    (["-croute", "jobs"], "jobs"),
    (["-vvc", "route", "tui"], "tui"),
    (["-vv", "route"], "route"),
    (["--config", "measure", "jobs"], "jobs"),
    (["--conf", "measure", "jobs"], "jobs"),
    (["--config=measure", "jobs"], "jobs"),
    (["--state-dir", "tui", "--verbose", "route", "job.sh"], "route"),
    (["--state", "tui", "route"], "route"),
    ([], None),
    (["--version"], None),
    (["-h", "measure"], None),
    (["-vh", "measure"], None),
    (["--", "measure"], None),
    (["-c"], None),
])
def test_command_of_skips_the_root_options_and_their_values(argv, command):
    assert cli.command_of(argv) == command


def test_parsing_with_the_root_options_gives_the_same_namespace_as_the_full_parser():
    argv = ["-vc", "site.toml", "--state-dir", "/tmp/x", "measure", "-q", "--", "true", "-c"]
    lazy = cli.build_parser(cli.command_of(argv)).parse_args(argv)
    full = cli.build_parser().parse_args(argv)
    assert {k: v for k, v in vars(lazy).items() if k != "root_parser"} == \
        {k: v for k, v in vars(full).items() if k != "root_parser"}


def test_a_command_imports_no_other_command_module(tmp_path):
    # A real `greend measure -q -- true`: the other commands' modules stay unimported...
    code = (
        "import sys\n"
        "from greend.cli import main\n"
        f"rc = main(['--state-dir', {str(tmp_path)!r}, 'measure', '-q', '--', 'true'])\n"
        "others = ['greend.daemon_cli', 'greend.slurm_acct_cli', 'greend.clidoc',\n"
        "          'greend.policies.cli', 'greend.tui.cli']\n"
        "from greend import config as c\n"
        "built = [m.__name__ for m in (c.Config, c.Collectors, c.Cluster) if m.__pydantic_complete__]\n"
        "print(rc, sorted(m for m in others if m in sys.modules), built, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "GREEND_SYSCONFDIR": str(tmp_path / "etc")})
    assert r.returncode == 0, r.stderr
    # ... and with the embedded default configuration, no configuration model built a validator
    # or serializer (the first one costs ~25 ms: docs/performance.md).
    assert r.stderr.strip().splitlines()[-1] == "0 [] []"


def test_an_unknown_command_still_lists_every_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "greend.cli", "mesure"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "invalid choice: 'mesure'" in r.stderr
    assert "'measure'" in r.stderr and "'route'" in r.stderr and "'tui'" in r.stderr


def _fields_set_tree(m) -> list:
    from pydantic import BaseModel

    out = [(type(m).__name__, sorted(m.model_fields_set), m.__pydantic_private__)]
    for name in type(m).model_fields:
        v = getattr(m, name)
        for sub in (v.values() if isinstance(v, dict) else [v]):
            if isinstance(sub, BaseModel):
                out += _fields_set_tree(sub)
    return out


def test_the_embedded_default_loads_without_validation_and_equals_a_validated_one():
    from greend import config as config_mod

    quick = config_mod.load(None)
    validated = config_mod.Config()
    assert quick == validated
    assert quick.model_dump() == validated.model_dump()
    assert _fields_set_tree(quick) == _fields_set_tree(validated)
    # ... and equals the default read from a file (an empty one: every value at its default).
    assert quick == config_mod.parse({})
    assert quick.resolved_state_dir() == validated.resolved_state_dir()
    assert config_mod.to_toml(quick) == config_mod.to_toml(validated)


def test_the_default_does_not_build_the_validators_at_import():
    # The point of _defaults: `greend measure` with no configuration file builds no validator.
    code = ("from greend import config as c\n"
            "cfg = c.load(None)\n"
            "print(c.Config.__pydantic_complete__, c.Cluster.__pydantic_complete__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


# -- the garbage collector during start-up (greend.cmdline.pause_gc) ------------------------------
@pytest.fixture
def collector_on():
    import gc

    assert gc.isenabled()
    yield
    gc.enable()


def test_every_command_but_the_tui_runs_with_the_collector_and_main_always_resumes_it(
        monkeypatch, collector_on, tmp_path):
    import gc

    seen = {}

    def fake_jobs(args):  # what a command sees when it runs
        seen["jobs"] = gc.isenabled()
        return 0

    fake_jobs.__module__ = "greend.cli"
    monkeypatch.setattr(cli, "cmd_jobs", fake_jobs)
    assert cli.main(["--state-dir", str(tmp_path), "jobs"]) == 0
    assert seen == {"jobs": True} and gc.isenabled()

    from greend.tui import cli as tui_cli

    def fake_tui(args):  # the TUI resumes it itself, once its first page is painted
        seen["tui"] = gc.isenabled()
        return 0

    fake_tui.__module__ = "greend.tui.cli"
    monkeypatch.setattr(tui_cli, "cmd_tui", fake_tui)
    assert cli.main(["tui", "--ledger", str(tmp_path / "none.sqlite")]) == 0
    assert seen["tui"] is False
    assert gc.isenabled()  # main resumed it on the way out

    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
    assert gc.isenabled()


def test_resume_only_resumes_what_pause_paused_and_freeze_keeps_start_up_objects(collector_on):
    import gc

    from greend import cmdline

    gc.disable()  # somebody else's choice (e.g. an embedding program): left as it is
    cmdline.pause_gc()
    cmdline.resume_gc()
    assert not gc.isenabled()
    gc.enable()
    before = gc.get_freeze_count()
    cmdline.pause_gc()
    assert not gc.isenabled()
    cmdline.resume_gc(freeze=True)
    try:
        assert gc.isenabled() and gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


def test_the_greend_command_pauses_the_collector_before_its_modules_load():
    code = ("import gc, sys\n"
            "import greend.__main__\n"
            "print(gc.isenabled(), 'greend.cli' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False", "True"], r.stderr
    r = subprocess.run([sys.executable, "-m", "greend", "--version"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("greend "), r.stderr
