"""What every greend dashboard shares, on top of grafana-foundation-sdk: the datasource variable,
label variables, queries and the few panel kinds we use, each with a unit.

Units are Grafana unit ids. Energy in joules (SI-scaled: kJ, MJ) for jobs and kWh for sites; carbon
and water use custom SI units so that Grafana scales them (mgCO2e, kgCO2e; mL, L).
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import bargauge, stat, table, timeseries
from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DashboardLinkType,
    DataSourceRef,
    DataTransformerConfig,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")

# Grafana unit ids
WATT = "watt"
JOULE = "joule"
KWH = "kwatth"
CARBON = "si:gCO2e"
CARBON_PER_HOUR = "si:gCO2e/h"
CARBON_INTENSITY = "suffix:gCO2e/kWh"
LITRE = "litre"
LITRE_PER_HOUR = "litreh"
RATIO = "percentunit"
SECONDS = "s"
BYTES = "bytes"
COUNT = "short"
PER_MINUTE = "cpm"
CORES = "suffix: cores"
YES_NO = "bool_yes_no"
UNITS = {WATT, JOULE, KWH, CARBON, CARBON_PER_HOUR, CARBON_INTENSITY, LITRE, LITRE_PER_HOUR, RATIO,
         SECONDS, BYTES, COUNT, PER_MINUTE, CORES, YES_NO}

J_PER_KWH = "3.6e6"

ALL = ".*"  # the value "All" stands for in regex matchers: also matches an empty (absent) label


def datasource_variable() -> db.DatasourceVariable:
    return db.DatasourceVariable("datasource").label("Data source").type("prometheus")


def label_variable(name: str, label: str, selector: str, title: str) -> db.QueryVariable:
    """A multi-value variable listing the values of `label` in `selector` (a series selector)."""
    query = f"label_values({selector}, {label})"
    return (db.QueryVariable(name).label(title).datasource(DS)
            .query({"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"})
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(ALL)
            .current(VariableOption(selected=True, text=["All"], value=["$__all"])))


def query(expr: str, legend: str = "", ref: str = "A", instant: bool = False,
          table: bool = False) -> prom.Dataquery:
    """A Prometheus query; instant ones (totals over $__range, current values) are evaluated once at
    the end of the time range instead of at every step."""
    q = prom.Dataquery().expr(expr).ref_id(ref).datasource(DS).legend_format(legend or "__auto")
    q = q.instant() if instant or table else q.range()
    if table:
        q = q.format(PromQueryFormat.TABLE)
    return q


def _thresholds(steps: list[tuple[float | None, str]]) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(value=v, color=c) for v, c in steps])


GREEN = [(None, "green")]


def timeseries_panel(title: str, unit: str, *queries: prom.Dataquery, description: str = "",
                     stack: bool = False, width: int = 12, height: int = 8) -> timeseries.Panel:
    p = (timeseries.Panel().title(title).description(description).unit(unit).datasource(DS)
         .span(width).height(height).targets(list(queries)).fill_opacity(10 if not stack else 40)
         .legend(common_b.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                 .placement(common.LegendPlacement.BOTTOM).show_legend(True))
         .tooltip(common_b.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                  .sort(common.SortOrder.DESCENDING)))
    if stack:
        p = p.stacking(common_b.StackingConfig().mode(common.StackingMode.NORMAL))
    return p


def stat_panel(title: str, unit: str, q: prom.Dataquery, description: str = "", width: int = 4,
               height: int = 4, thresholds: list[tuple[float | None, str]] | None = None) -> stat.Panel:
    return (stat.Panel().title(title).description(description).unit(unit).datasource(DS)
            .span(width).height(height).with_target(q.instant())
            .graph_mode(common.BigValueGraphMode.NONE).color_mode(common.BigValueColorMode.VALUE)
            .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .thresholds(_thresholds(thresholds or GREEN)))


def bargauge_panel(title: str, unit: str, q: prom.Dataquery, description: str = "", width: int = 12,
                   height: int = 8, thresholds: list[tuple[float | None, str]] | None = None,
                   max_value: float | None = None) -> bargauge.Panel:
    p = (bargauge.Panel().title(title).description(description).unit(unit).datasource(DS)
         .span(width).height(height).with_target(q.instant()).orientation(common.VizOrientation.HORIZONTAL)
         .display_mode(common.BarGaugeDisplayMode.GRADIENT)
         .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
         .thresholds(_thresholds(thresholds or GREEN)).min(0))
    if max_value is not None:
        p = p.max(max_value)
    return p


class Column:
    """One value column of a table panel: an instant query, its header and its unit."""

    def __init__(self, header: str, unit: str, expr: str):
        self.header, self.unit, self.expr = header, unit, expr


def table_panel(title: str, labels: list[str], columns: list[Column], description: str = "",
                width: int = 24, height: int = 9, links: dict[str, tuple[str, str]] | None = None,
                sort_by: str | None = None) -> table.Panel:
    """One instant query per column, merged on `labels`; `links` maps a label column to
    (link title, url) data links (urls may use ${__data.fields.<label>})."""
    refs = [chr(ord("A") + i) for i in range(len(columns))]
    rename = {f"Value #{r}": c.header for r, c in zip(refs, columns, strict=True)}
    order = {name: i for i, name in enumerate([*labels, *rename])}
    hidden = [n for n in ("Time", "__name__", "instance", "job") if n not in labels]
    p = (table.Panel().title(title).description(description).unit(columns[0].unit).datasource(DS)
         .span(width).height(height)
         .targets([query(c.expr, ref=r, table=True) for r, c in zip(refs, columns, strict=True)])
         .with_transformation(DataTransformerConfig(id_val="merge", options={}))
         .with_transformation(DataTransformerConfig(id_val="organize", options={
             "excludeByName": dict.fromkeys(hidden, True),
             "indexByName": order, "renameByName": rename})))
    for c in columns:
        p = p.override_by_name(c.header, [DynamicConfigValue(id_val="unit", value=c.unit)])
    for label, (link_title, url) in (links or {}).items():
        p = p.override_by_name(label, [DynamicConfigValue(id_val="links", value=[
            {"title": link_title, "url": url}])])
    if sort_by:
        p = p.sort_by([common_b.TableSortByFieldState().display_name(sort_by).desc(True)])
    return p


def row(title: str) -> db.Row:
    return db.Row(title)


class Board:
    """A dashboard under construction: numbers panels in order and keeps greend's common settings."""

    def __init__(self, uid: str, title: str, description: str, tags: list[str] | None = None):
        self.next_id = 1
        self.d = (db.Dashboard(title).uid(uid).description(description)
                  .tags(["greend", *(tags or [])]).timezone("browser").refresh("1m")
                  .time("now-6h", "now").tooltip(DashboardCursorSync.CROSSHAIR).editable()
                  .link(db.DashboardLink("greend").type(DashboardLinkType.DASHBOARDS).tags(["greend"])
                        .as_dropdown(True).include_vars(False).keep_time(True))
                  .with_variable(datasource_variable()))

    def variable(self, v) -> Board:
        self.d = self.d.with_variable(v)
        return self

    def row(self, title: str) -> Board:
        self.d = self.d.with_row(row(title).id(self.next_id))
        self.next_id += 1
        return self

    def panel(self, p) -> Board:
        self.d = self.d.with_panel(p.id(self.next_id))
        self.next_id += 1
        return self

    def build(self):
        return self.d.build()
