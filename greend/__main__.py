"""`greend` as a command: the installed `greend` script (pyproject's [project.scripts]) and
`python -m greend` start here. The cyclic garbage collector is paused before the command line's
modules load (greend.cmdline.pause_gc says why); greend.cli.main resumes it."""

from greend.cmdline import pause_gc

pause_gc()

from greend.cli import main  # noqa: E402 - after the pause, by design

if __name__ == "__main__":
    raise SystemExit(main())
