"""Reference data: CodeCarbon's CPU TDP table and per-country energy mix, vendored in greend/data/
with their provenance (CodeCarbon's version, SHA-256 of each file), plus per-core CPU family figures.

greend uses CodeCarbon for its reference data only, never its tracker: installing CodeCarbon would pull
~26 packages (pandas, numpy, ...: ~224 MB) onto every node for two data files. `python -m
greend.refdata update --from-codecarbon` (bin/update-refdata) rewrites the vendored files from an
installed CodeCarbon and records its version.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

# Li, Yang, Islam, Ren, "Making AI Less Thirsty" (arXiv 2304.03271), official code, from Macknick et
# al. 2012: water consumed off-site per kWh generated, by fuel, L/kWh.
EWIF_BY_FUEL_L_PER_KWH: dict[str, float] = {
    "coal": 1.703,
    "gas": 1.136,
    "nuclear": 2.271,
    "oil": 1.325,
    "other": 1.798,
    "solar": 0.0,
    "wind": 0.0,
    "hydro": 0.0,
}
EWIF_SOURCE = "Li et al. 2023 (arXiv 2304.03271) per-fuel EWIF (Macknick et al. 2012)"
WORLD_CARBON_INTENSITY_G_PER_KWH = 475.0
WORLD_CARBON_INTENSITY_SOURCE = "IEA 2019 world average (CodeCarbon, Green Algorithms)"


class RefDataError(RuntimeError):
    """The bundled reference data could not be found or read."""


DATA_DIR = Path(__file__).resolve().parent / "data"
PROVENANCE_FILE = "PROVENANCE.json"
# The files taken from CodeCarbon: (path inside its package, name in greend/data/).
CODECARBON_FILES = (
    ("data/hardware/cpu_power.csv", "cpu_power.csv"),
    ("data/private_infra/global_energy_mix.json", "global_energy_mix.json"),
)
CODECARBON_LICENSE_FILE = "LICENSE.codecarbon"


def data_dir() -> Path:
    return DATA_DIR


@functools.cache
def provenance() -> dict:
    """Where greend/data/ came from: CodeCarbon's version, each file's origin and SHA-256."""
    path = data_dir() / PROVENANCE_FILE
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RefDataError(f"cannot read {path}: {e}") from e


def codecarbon_version() -> str:
    """The CodeCarbon release whose data files greend/data/ holds (recorded when vendored)."""
    try:
        return str(provenance()["codecarbon"]["version"])
    except (RefDataError, KeyError, TypeError):
        return "unknown"


@dataclass(frozen=True, slots=True)
class CountryMix:
    iso_code: str
    name: str
    year: int
    carbon_intensity_g_per_kwh: float
    ewif_l_per_kwh: float
    source: str


@functools.cache
def _energy_mix() -> dict:
    path = data_dir() / "global_energy_mix.json"
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RefDataError(f"cannot read {path}: {e}") from e


def ewif_of_mix(row: dict) -> float:
    """Generation-weighted off-site water intensity of a country's mix (docs/methodology.md §4)."""
    gen = {
        "coal": row.get("coal_TWh", 0.0),
        "gas": row.get("gas_TWh", 0.0),
        "nuclear": row.get("nuclear_TWh", 0.0),
        "oil": row.get("oil_TWh", 0.0),
        # biofuel and other renewables (geothermal, biomass...) count as "other" in Li et al.
        "other": row.get("biofuel_TWh", 0.0) + row.get("other_renewable_exc_biofuel_TWh", 0.0),
        "solar": row.get("solar_TWh", 0.0),
        "wind": row.get("wind_TWh", 0.0),
        "hydro": row.get("hydroelectricity_TWh", 0.0),
    }
    total = sum(gen.values())
    if total <= 0:
        raise RefDataError(f"no generation data for {row.get('iso_code', '?')}")
    return sum(gen[k] * EWIF_BY_FUEL_L_PER_KWH[k] for k in gen) / total


def country_mix(iso_code: str) -> CountryMix:
    """Carbon intensity and derived EWIF for an ISO 3166-1 alpha-3 country code."""
    mix = _energy_mix()
    row = mix.get(iso_code.upper())
    if row is None:
        raise KeyError(iso_code)
    return CountryMix(
        iso_code=row["iso_code"],
        name=row.get("country_name", iso_code),
        year=int(row.get("year", 0)),
        carbon_intensity_g_per_kwh=float(row["carbon_intensity"]),
        ewif_l_per_kwh=ewif_of_mix(row),
        source=f"CodeCarbon {codecarbon_version()} global_energy_mix.json "
        f"({row.get('country_name', iso_code)} {row.get('year', '')}, Our World in Data / Ember)",
    )


def known_countries() -> list[str]:
    return sorted(_energy_mix())


_NOISE = re.compile(
    r"\((?:r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\bwith radeon.*$|\b\d+-core\b|\bcore\(tm\)",
    re.IGNORECASE,
)


def _tokens(name: str) -> tuple[str, ...]:
    return tuple(_NOISE.sub(" ", name).lower().replace(",", " ").split())


# The same noise for a whole lower-cased table, one name a line: one substitution over the joined
# names costs a third of one per name (the lookahead skips most positions at once), and
# `greend measure` pays for this table on every start (docs/performance.md).
_NOISE_LINES = re.compile(
    r"(?=[(@cpw\d])(?:\((?:r|tm)\)|\bcpu\b|\bprocessor\b|@.*$|\bwith radeon.*$|\b\d+-core\b"
    r"|\bcore\(tm\))",
    re.MULTILINE,
)


def _tokens_of_names(names: list[str]) -> list[tuple[str, ...]]:
    """_tokens of each name, in one pass (names with a line break in them go one by one)."""
    if any("\n" in n or "\r" in n for n in names):
        return [_tokens(n) for n in names]
    text = _NOISE_LINES.sub(" ", "\n".join(names).lower()).replace(",", " ")
    return [tuple(line.split()) for line in text.split("\n")]


@functools.cache
def _cpu_table() -> dict[tuple[str, ...], tuple[str, float]]:
    path = data_dir() / "cpu_power.csv"
    rows: list[tuple[str, float]] = []
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            if "Name" not in header or "TDP" not in header:
                raise RefDataError(f"{path}: expected the columns Name,TDP, found {header}")
            i, j = header.index("Name"), header.index("TDP")
            for row in reader:
                try:
                    rows.append((row[i], float(row[j])))
                except (IndexError, ValueError):
                    continue
    except OSError as e:
        raise RefDataError(f"cannot read {path}: {e}") from e
    names = [name for name, _ in rows]
    return dict(zip(_tokens_of_names(names), rows, strict=True))


def cpu_tdp_w(model_name: str) -> tuple[str, float] | None:
    """TDP of one CPU package by model name, as (matched table name, watts), or None if unknown.

    An exact match of the normalised name wins; otherwise the longest table entry whose words all
    appear in the model name (so "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz" finds "Intel Xeon Gold
    6248" but never "...6248R"). A bare family name ("AMD EPYC") matches nothing: better the
    documented fallback than a guess.
    """
    table = _cpu_table()
    toks = _tokens(model_name)
    if toks in table:
        return table[toks]
    have = set(toks)
    best: tuple[int, tuple[str, float]] | None = None
    for key, value in table.items():
        if len(key) >= 2 and set(key) <= have and (best is None or len(key) > best[0]):
            best = (len(key), value)
    return best[1] if best else None


@dataclass(frozen=True, slots=True)
class CpuFamily:
    """Per-core power of a CPU family (vendor and series), for a CPU not in the TDP table."""

    family: str
    w_per_core: float
    entries: str
    source: str


@functools.cache
def _cpu_families() -> list[tuple[re.Pattern, CpuFamily]]:
    path = data_dir() / "cpu_families.csv"
    src = provenance().get("cpu_families.csv", {}).get("source", "Green Algorithms TDP_cpu.csv")
    out = []
    try:
        with path.open(encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f), start=2):
                try:
                    fam = CpuFamily(row["family"], float(row["w_per_core"]), row["entries"], src)
                    out.append((re.compile(row["match"], re.IGNORECASE), fam))
                except (KeyError, ValueError, TypeError, re.error) as e:
                    raise RefDataError(f"{path} line {n}: {e}") from e
    except OSError as e:
        raise RefDataError(f"cannot read {path}: {e}") from e
    return out


def cpu_family(model_name: str) -> CpuFamily | None:
    """The first family (most specific first) whose pattern matches the normalised model name."""
    name = " ".join(_tokens(model_name))
    for pattern, fam in _cpu_families():
        if pattern.search(name):
            return fam
    return None


# -- refreshing the vendored data from an installed CodeCarbon ----------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_codecarbon(where: Path | None = None) -> tuple[Path, str]:
    """CodeCarbon's package directory and version, without importing it (its __init__ starts the
    tracker's imports). `where` is the package directory or the site-packages holding it."""
    if where is None:
        spec = importlib.util.find_spec("codecarbon")
        if spec is None or not spec.submodule_search_locations:
            raise RefDataError("codecarbon is not installed here: `pip install codecarbon==X.Y.Z` in a "
                               "scratch venv and pass --from-codecarbon PATH/TO/site-packages")
        pkg = Path(next(iter(spec.submodule_search_locations)))
    else:
        pkg = where / "codecarbon" if (where / "codecarbon").is_dir() else where
    if not (pkg / "data").is_dir():
        raise RefDataError(f"{pkg}: not a codecarbon package directory (no data/ in it)")
    metas = sorted(pkg.parent.glob("codecarbon-*.dist-info/METADATA"))
    if not metas:
        raise RefDataError(f"{pkg.parent}: no codecarbon-*.dist-info: cannot tell CodeCarbon's version")
    version = ""
    for line in metas[-1].read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("Version:"):
            version = line.split(":", 1)[1].strip()
            break
    if not version:
        raise RefDataError(f"{metas[-1]}: no Version: field")
    return pkg, version


def _check_cpu_table(path: Path) -> int:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"Name", "TDP"} <= set(reader.fieldnames):
            raise RefDataError(f"{path}: expected the columns Name,TDP, found {reader.fieldnames}")
        return sum(1 for _ in reader)


def _check_energy_mix(path: Path) -> int:
    try:
        mix = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RefDataError(f"{path}: not JSON: {e}") from e
    if not isinstance(mix, dict) or not all(
        isinstance(v, dict) and "carbon_intensity" in v for v in mix.values()
    ):
        raise RefDataError(f"{path}: expected an object of countries, each with carbon_intensity")
    return len(mix)


def update_from_codecarbon(where: Path | None = None, dest: Path | None = None) -> dict:
    """Copy CodeCarbon's two data files and its licence into dest (greend/data/) and record the
    version and checksums in PROVENANCE.json. Checks both files first: a malformed source changes
    nothing."""
    pkg, version = find_codecarbon(where)
    dest = dest or data_dir()
    srcs = {name: pkg / rel for rel, name in CODECARBON_FILES}
    for src in srcs.values():
        if not src.is_file():
            raise RefDataError(f"CodeCarbon {version} has no {src}: its layout changed, update "
                               "CODECARBON_FILES in greend/refdata.py")
    counts = {"cpu_power.csv": _check_cpu_table(srcs["cpu_power.csv"]),
              "global_energy_mix.json": _check_energy_mix(srcs["global_energy_mix.json"])}
    lic = sorted(pkg.parent.glob("codecarbon-*.dist-info/licenses/LICENSE*")) + sorted(
        pkg.parent.glob("codecarbon-*.dist-info/LICENSE*"))
    try:
        old = json.loads((dest / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    prov = {k: v for k, v in old.items() if k != "codecarbon"}
    prov["codecarbon"] = {
        "version": version,
        "license": "MIT (see LICENSE.codecarbon)",
        "url": "https://github.com/mlco2/codecarbon",
        "files": {name: {"from": f"codecarbon/{rel}", "sha256": _sha256(srcs[name]),
                         "entries": counts[name]} for rel, name in CODECARBON_FILES},
    }
    dest.mkdir(parents=True, exist_ok=True)
    staged = []
    for name, src in srcs.items():
        staged.append((dest / f".{name}.new", dest / name, src.read_bytes()))
    if lic:
        staged.append((dest / f".{CODECARBON_LICENSE_FILE}.new", dest / CODECARBON_LICENSE_FILE,
                       lic[0].read_bytes()))
    staged.append((dest / f".{PROVENANCE_FILE}.new", dest / PROVENANCE_FILE,
                   (json.dumps(prov, indent=2) + "\n").encode()))
    for tmp, _, data in staged:
        tmp.write_bytes(data)
    for tmp, final, _ in staged:
        tmp.replace(final)
    provenance.cache_clear()
    _cpu_table.cache_clear()
    _energy_mix.cache_clear()
    return prov["codecarbon"]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m greend.refdata",
        description="Show or refresh greend's vendored reference data (greend/data/).",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("show", help="print the provenance of the vendored data")
    u = sub.add_parser(
        "update", help="rewrite greend/data/ from an installed CodeCarbon, recording its version",
        description="Copy cpu_power.csv and global_energy_mix.json and CodeCarbon's licence from an "
        "installed CodeCarbon into greend/data/ and record its version and the files' SHA-256 in "
        "PROVENANCE.json. Example: python -m venv /tmp/cc && /tmp/cc/bin/pip install "
        "codecarbon==3.3.2 && bin/update-refdata --from-codecarbon /tmp/cc/lib/python3.11/site-packages",
    )
    u.add_argument("--from-codecarbon", metavar="PATH", type=Path, nargs="?", const=None,
                   default=None, help="codecarbon's package directory or the site-packages holding "
                   "it (default: the one this Python imports)")
    u.add_argument("--dest", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        if args.cmd == "show":
            print(json.dumps(provenance(), indent=2))
            return 0
        info = update_from_codecarbon(args.from_codecarbon, args.dest)
    except (RefDataError, OSError) as e:
        print(f"greend.refdata: {e}", file=sys.stderr)
        return 1
    print(f"greend/data/ now holds CodeCarbon {info['version']}'s reference data: "
          + ", ".join(f"{n} ({f['entries']} entries)" for n, f in info["files"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
