"""Write (or check) the committed dashboard JSON from the code that builds it.

    .venv/bin/python -m dashboards.build           # rewrite dashboards/*.json
    .venv/bin/python -m dashboards.build --check   # exit 1 and name the files that differ
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.cog.encoder import JSONEncoder

from . import footprints, health, site_overview

HERE = Path(__file__).resolve().parent
DASHBOARDS = {
    "greend-site-overview.json": site_overview.build,
    "greend-footprints.json": footprints.build,
    "greend-health.json": health.build,
}


def render(build) -> str:
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def rendered() -> dict[str, str]:
    return {name: render(fn) for name, fn in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dashboards.build", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    args = ap.parse_args(argv)
    stale = []
    for name, text in rendered().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date (run python -m dashboards.build): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
