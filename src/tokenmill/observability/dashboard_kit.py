"""Building blocks of tokenmill's Grafana dashboards, on Grafana's own SDK
(grafana-foundation-sdk): PromQL fragments, the two variables, and the few panel shapes the
dashboards use, so every dashboard looks and filters the same way.

Only the dashboard generator imports this module (the SDK needs Python 3.11+); the server
never does.
"""

from __future__ import annotations

from collections.abc import Sequence

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.models import common, dashboard

# Grafana fills these in per panel: the rate window it derives from the scrape interval, and
# the dashboard's time range (the SLO tiles' window).
RATE_WINDOW = "$__rate_interval"
RANGE = "$__range"
# `=~`, not `=`: with "All" (or several models) selected Grafana substitutes a regex.
MODEL = 'model_name=~"$model_name"'
QUANTILES = (0.5, 0.9, 0.99)
GRID_WIDTH = 24  # Grafana's grid columns

_DATASOURCE = common.DataSourceRef(type_val="prometheus", uid="${datasource}")


def series(metric: str, selector: str = "") -> str:
    return f"{metric}{{{selector}}}" if selector else metric


def rate(metric: str, selector: str = "", window: str = RATE_WINDOW) -> str:
    return f"rate({series(metric, selector)}[{window}])"


def increase(metric: str, selector: str = "", window: str = RANGE) -> str:
    return f"increase({series(metric, selector)}[{window}])"


def quantile(q: float, histogram: str, selector: str) -> str:
    """The q-quantile of a histogram over the rate window, all series of the selector pooled
    (several replicas of one model are one latency distribution to their users)."""
    return f"histogram_quantile({q}, sum by (le) ({rate(histogram + '_bucket', selector)}))"


def mean(histogram: str, selector: str) -> str:
    return f"sum({rate(histogram + '_sum', selector)}) / sum({rate(histogram + '_count', selector)})"


class Query:
    """One PromQL expression of a panel and its legend (Grafana's `{{label}}` templates)."""

    def __init__(self, expr: str, legend: str = "", instant: bool = False) -> None:
        self.expr, self.legend, self.instant = expr, legend, instant

    def build(self, ref_id: str) -> prometheus.Dataquery:
        q = prometheus.Dataquery().expr(self.expr).ref_id(ref_id).datasource(_DATASOURCE)
        if self.legend:
            q = q.legend_format(self.legend)
        return q.instant() if self.instant else q


def percentiles(histogram: str, selector: str = MODEL) -> list[Query]:
    return [Query(quantile(q, histogram, selector), f"p{q * 100:g}") for q in QUANTILES]


def _targets(panel, queries: Sequence[Query]):
    for i, q in enumerate(queries):
        panel = panel.with_target(q.build(chr(ord("A") + i)))
    return panel


def _steps(*steps: tuple[float | None, str]) -> dash_b.ThresholdsConfig:
    """Threshold steps: (from value, color); the first starts at -inf (None)."""
    return dash_b.ThresholdsConfig().mode(dashboard.ThresholdsMode.ABSOLUTE).steps(
        [dashboard.Threshold(value=v, color=c) for v, c in steps])


def graph(title: str, description: str, unit: str, queries: Sequence[Query], *, width: int = 12,
          height: int = 8, max_val: float | None = None, line_at: float | None = None) -> timeseries.Panel:
    """A time series panel. `line_at`: a dashed red line at that value (an SLO threshold)."""
    panel = (timeseries.Panel().title(title).description(description).datasource(_DATASOURCE).unit(unit)
             .span(width).height(height).min(0).fill_opacity(10).show_points(common.VisibilityMode.NEVER)
             .legend(common_b.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM))
             .tooltip(common_b.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                      .sort(common.SortOrder.DESCENDING)))
    if max_val is not None:
        panel = panel.max(max_val)
    if line_at is not None:
        panel = (panel.thresholds(_steps((None, "transparent"), (line_at, "red")))
                 .thresholds_style(common_b.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED)))
    return _targets(panel, queries)


def tile(title: str, description: str, unit: str, query: Query, steps: Sequence[tuple[float | None, str]], *,
         width: int = 6, height: int = 4, decimals: int | None = None) -> stat.Panel:
    """A single-number panel colored by threshold steps."""
    panel = (stat.Panel().title(title).description(description).datasource(_DATASOURCE).unit(unit)
             .span(width).height(height).thresholds(_steps(*steps))
             .color_mode(common.BigValueColorMode.BACKGROUND).graph_mode(common.BigValueGraphMode.NONE)
             .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    if decimals is not None:
        panel = panel.decimals(decimals)
    return _targets(panel, [query])


def new_dashboard(uid: str, title: str, description: str, tags: Sequence[str],
                  model_values: str) -> dash_b.Dashboard:
    """A dashboard with the `datasource` and `model_name` variables and links to its siblings.

    `model_values`: the Grafana query listing the models, e.g.
    "label_values(tokenmill:num_requests_running, model_name)".
    """
    all_models = dashboard.VariableOption(text="All", value="$__all", selected=True)
    return (dash_b.Dashboard(title).uid(uid).description(description).tags(["tokenmill", *tags])
            .time("now-1h", "now").refresh("30s").tooltip(dashboard.DashboardCursorSync.CROSSHAIR)
            .link(dash_b.DashboardLink("tokenmill").type(dashboard.DashboardLinkType.DASHBOARDS)
                  .tags(["tokenmill"]).as_dropdown(True).include_vars(True).keep_time(True))
            .with_variable(dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus"))
            .with_variable(dash_b.QueryVariable("model_name").label("Model").datasource(_DATASOURCE)
                           .query(model_values).definition(model_values).multi(True).include_all(True)
                           .all_value(".*").current(all_models).sort(dashboard.VariableSort.ALPHABETICAL_ASC)
                           .refresh(dashboard.VariableRefresh.ON_TIME_RANGE_CHANGED)))


def number_panels(built: dashboard.Dashboard) -> dashboard.Dashboard:
    """Gives every panel and row a distinct id (1, 2, ...): Grafana keys panel links,
    "view panel" and its own edits on them, and the SDK leaves them all 0."""
    for i, panel in enumerate(built.panels or [], start=1):
        panel.id_val = i
    return built
