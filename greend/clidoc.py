"""Shell completion and a man page generated from greend's own argparse definitions, so that they
never drift from the commands: `greend completion bash|zsh`, `greend man` (docs/admin.md).

A small generator rather than a dependency: the node install stays lean, and the parser tree is
walked the same way for both outputs."""

from __future__ import annotations

import argparse
import datetime
import re
import shlex

from . import __version__

SUMMARY = "per-job energy, carbon and water footprint of compute jobs, and frugal job routing"


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _helps(p: argparse.ArgumentParser) -> dict[str, str]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return {c.dest: c.help or "" for c in a._choices_actions}
    return {}


def walk(p: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the root and every sub-command, depth first."""
    yield path, p
    for name, sp in _subparsers(p).items():
        yield from walk(sp, (*path, name))


def _options(p: argparse.ArgumentParser) -> list[str]:
    """The options, and the choices of positional arguments (`greend completion bash`)."""
    out = [s for a in p._actions if a.help != argparse.SUPPRESS for s in a.option_strings]
    return out + [str(c) for a in p._actions if not a.option_strings and a.choices
                  and not isinstance(a, argparse._SubParsersAction) for c in a.choices]


def _choices(p: argparse.ArgumentParser) -> dict[str, list[str]]:
    out = {}
    for a in p._actions:
        if a.option_strings and a.choices and not isinstance(a, argparse._SubParsersAction):
            for s in a.option_strings:
                out[s] = [str(c) for c in a.choices]
    return out


# -- bash (zsh through bashcompinit) ------------------------------------------------------------
def bash(parser: argparse.ArgumentParser) -> str:
    prog = parser.prog
    fn = "_" + re.sub(r"\W", "_", prog)
    cases, choice_cases = [], []
    for path, p in walk(parser):
        key = " ".join(path)
        words = sorted(_subparsers(p)) + _options(p)
        cases.append(f"        {shlex.quote(key)}) words={shlex.quote(' '.join(words))} ;;")
        for opt, ch in _choices(p).items():
            choice_cases.append(f"        {shlex.quote(key + '|' + opt)}) words="
                                f"{shlex.quote(' '.join(ch))} ;;")
    # The command path is the words so far that name sub-commands (options and their values are
    # skipped); completion offers that command's sub-commands and options, or an option's choices.
    return f"""# bash completion for {prog} {__version__}, generated from its argparse definitions
# (`{prog} completion bash`). Install: {prog} completion bash > /etc/bash_completion.d/{prog}
{fn}_words() {{
    case "$1" in
{chr(10).join(cases)}
        *) words="" ;;
    esac
}}
{fn}_choices() {{
    case "$1" in
{chr(10).join(choice_cases) if choice_cases else "        __none__) ;;"}
        *) return 1 ;;
    esac
}}
{fn}() {{
    local cur prev path="" w i words
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        [ "$w" = "--" ] && return 0
        case "$w" in -*) continue ;; esac
        {fn}_words "${{path# }}"
        case " $words " in *" $w "*) path="$path $w" ;; esac
    done
    path="${{path# }}"
    if [[ "$prev" == -* ]] && {fn}_choices "$path|$prev"; then
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
        return 0
    fi
    {fn}_words "$path"
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F {fn} {prog}
"""


def zsh(parser: argparse.ArgumentParser) -> str:
    return ("#compdef " + parser.prog + "\n# zsh: the bash completion through bashcompinit\n"
            "autoload -Uz bashcompinit && bashcompinit\n" + bash(parser))


# -- man page (roff, man(7) macros) -------------------------------------------------------------
def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln if ln.startswith((".", "'")) else ln) for ln in text.splitlines())


def _usage(p: argparse.ArgumentParser) -> str:
    return " ".join(p.format_usage().split())[len("usage: "):]


def man(parser: argparse.ArgumentParser, date: datetime.date | None = None) -> str:
    prog = parser.prog
    date = date or datetime.date.today()
    out = [f'.TH {prog.upper()} 1 "{date:%Y-%m-%d}" "{prog} {__version__}" "User Commands"',
           ".SH NAME", f"{prog} \\- " + _roff(SUMMARY),
           ".SH SYNOPSIS", ".nf", _roff(_usage(parser)), ".fi",
           ".SH DESCRIPTION", _roff((parser.description or "").strip()), ".SH COMMANDS"]
    for path, p in walk(parser):
        if not path:
            continue
        helps = _helps(next(sp for pth, sp in walk(parser) if pth == path[:-1]))
        out += [".TP", f"\\fB{prog} {_roff(' '.join(path))}\\fR",
                _roff(helps.get(path[-1], "")), ".RS", ".PP", ".nf", _roff(_usage(p)), ".fi"]
        if p.description:
            out += [".PP", _roff(p.description.strip())]
        for a in p._actions:
            if not a.option_strings or a.help == argparse.SUPPRESS:
                continue
            flag = ", ".join(a.option_strings)
            if a.nargs != 0:
                flag += " " + (a.metavar or a.dest.upper())
            out += [".TP", f"\\fB{_roff(flag)}\\fR", _roff(a.help or "")]
        out.append(".RE")
    options = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]
    out.append(".SH OPTIONS")
    for a in options:
        flag = ", ".join(a.option_strings) + ("" if a.nargs == 0 else " " + (a.metavar or a.dest.upper()))
        out += [".TP", f"\\fB{_roff(flag)}\\fR", _roff(a.help or "")]
    if parser.epilog:
        out += [".SH FILES AND ENVIRONMENT", ".nf", _roff(parser.epilog.strip()), ".fi"]
    out += [".SH SEE ALSO", "docs/admin.md, docs/configuration.md, docs/methodology.md in greend's "
            "documentation; \\fB" + prog + " share \\-\\-path\\fR for the installed units and examples."]
    return "\n".join(out) + "\n"


# -- commands -----------------------------------------------------------------------------------
def add_commands(sub) -> None:
    c = sub.add_parser(
        "completion", help="print a shell completion script (bash, zsh)",
        description="Print a completion script generated from greend's commands and options.",
        epilog="install:\n  greend completion bash > /etc/bash_completion.d/greend\n"
        "  greend completion zsh > /usr/local/share/zsh/site-functions/_greend",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("shell", choices=["bash", "zsh"])
    c.set_defaults(func=cmd_completion)
    m = sub.add_parser(
        "man", help="print greend's man page (roff)",
        description="Print the greend(1) man page, generated from greend's commands and options.",
        epilog="install:\n  greend man > /usr/local/share/man/man1/greend.1\nread:\n  greend man | man -l -",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.set_defaults(func=cmd_man)
    s = sub.add_parser(
        "share", help="where the systemd units, example configs, Prometheus rules and dashboards are",
        description="Print the directory of greend's admin files (installed with greend): "
        "packaging/ (systemd units), examples/ (configurations), dashboards/ (Grafana JSON, "
        "grafana/provisioning/, prometheus/ with rules/ and tests/); or one KIND's directory; "
        "or copy them all under DIR with --copy.",
        epilog="example:\n  cp \"$(greend share systemd)\"/greend.service /etc/systemd/system/\n"
        "  greend share --copy /root/greend-files",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .share import KINDS

    s.add_argument("kind", nargs="?", choices=list(KINDS), metavar="KIND",
                   help="one of: " + "; ".join(f"{k} ({v[1]})" for k, v in KINDS.items()))
    s.add_argument("--path", action="store_true", help="print the directory (the default)")
    s.add_argument("--copy", metavar="DIR", help="copy every file under DIR (never overwrites)")
    s.set_defaults(func=cmd_share)


def cmd_completion(args) -> int:
    # greend.cli hands its parser down (set_defaults): no import back into the module that imports this.
    print(bash(args.root_parser) if args.shell == "bash" else zsh(args.root_parser), end="")
    return 0


def cmd_man(args) -> int:
    print(man(args.root_parser), end="")
    return 0


def cmd_share(args) -> int:
    from pathlib import Path

    from . import share
    from .cmdline import fail as _fail

    try:
        if args.copy:
            files = share.copy(Path(args.copy))
            print(f"copied {len(files)} files under {args.copy}")
        else:
            print(share.path(args.kind))
    except share.ShareError as e:
        return _fail(f"share: {e}")
    except OSError as e:
        return _fail(f"share: {e}")
    return 0
