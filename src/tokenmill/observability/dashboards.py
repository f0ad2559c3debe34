"""tokenmill's Grafana dashboards as code: `tokenmill dashboards --output-dir deploy/grafana`
writes them as JSON (built with Grafana's SDK in dashboard_panels.py). The JSON under
deploy/grafana/ is generated, never edited by hand: a test compares it with this output, and
another evaluates every panel's query against a real Prometheus scraping a live server.

The SDK (grafana-foundation-sdk, Python 3.11+) and the SLOs (which import the server's metrics,
and so torch) are imported only when dashboards are built: `add_dashboards_parser` costs the
command line nothing, and nothing else needs the SDK.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenmill.observability.slo import LatencySLO

DEFAULT_OUTPUT_DIR = "deploy/grafana"
# Pinned exactly: the SDK is alpha and its JSON changes between releases (the committed files
# would go stale). And never unpinned: its epoch-versioned releases for old Grafanas
# ("1769699998!10.1.0") sort above 0.0.x, so a bare `pip install` picks Grafana 10.1's.
SDK_REQUIREMENT = "grafana-foundation-sdk==0.0.21"
_GENERATED_GLOB = "tokenmill-*.json"  # every file the generator owns in the output directory


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str  # the dashboard's title
    panel: str  # the panel's title
    expr: str  # PromQL with Grafana's variables: $model_name, $__rate_interval, $__range
    needs: str | None  # None, or what must run besides `tokenmill serve` for it to have data


@contextlib.contextmanager
def _classic_schema() -> Iterator[None]:
    """Silences the SDK's warnings (on import and on use) that point to its v2 dashboard
    schema, Grafana 12's newer API: the classic JSON built here is what file provisioning and
    the import dialog take, on Grafana 12 and on the versions before it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Prefer using dashboardv2", DeprecationWarning)
        yield


def _panels():
    with _classic_schema():
        from tokenmill.observability import dashboard_panels
    return dashboard_panels


def render_dashboards(slos: Sequence[LatencySLO] | None = None) -> dict[str, str]:
    """{filename: JSON text} of every dashboard, byte-for-byte what the command writes.
    `slos`: the SLO tiles' definitions (default: observability/slo.py's SLOS)."""
    if slos is None:
        from tokenmill.observability.slo import SLOS

        slos = SLOS
    with _classic_schema():
        from grafana_foundation_sdk.cog.encoder import JSONEncoder

        built = _panels().build_all(slos)
    # Sorted keys and a fixed indent: regenerating an unchanged dashboard changes no byte.
    encoder = JSONEncoder(sort_keys=True, indent=2, ensure_ascii=False)
    return {name: encoder.encode(board) + "\n" for name, board in built.items()}


def panel_queries(rendered: Mapping[str, str] | None = None) -> list[PanelQuery]:
    """Every query of every panel in `rendered` ({filename: JSON text}; default: the
    dashboards as generated now), with its dashboard, panel and what it needs to have data."""
    needs = {d.filename: d.needs for d in _panels().DASHBOARDS}
    rendered = render_dashboards() if rendered is None else rendered
    out = []
    for filename, text in rendered.items():
        board = json.loads(text)
        for panel in board.get("panels", []):
            for target in panel.get("targets", []):
                out.append(PanelQuery(board["title"], panel["title"], target["expr"], needs[filename]))
    return out


def write_dashboards(output_dir: Path, rendered: Mapping[str, str]) -> list[Path]:
    """Writes the dashboards and deletes generated files no longer generated (a renamed
    dashboard must not linger there, provisioned twice). Returns the paths written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in set(output_dir.glob(_GENERATED_GLOB)) - {output_dir / n for n in rendered}:
        stale.unlink()
    paths = []
    for name, text in rendered.items():
        path = output_dir / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def differences(output_dir: Path, rendered: Mapping[str, str]) -> list[str]:
    """What `write_dashboards` would change in `output_dir`, one line per file."""
    out = []
    for name, text in rendered.items():
        path = output_dir / name
        if not path.exists():
            out.append(f"{path}: missing")
        elif path.read_text(encoding="utf-8") != text:
            out.append(f"{path}: differs from the generator's output")
    out += [f"{p}: no longer generated" for p in sorted(set(output_dir.glob(_GENERATED_GLOB))
                                                        - {output_dir / n for n in rendered})]
    return out


def add_dashboards_parser(sub) -> None:
    p = sub.add_parser("dashboards", help="Write tokenmill's Grafana dashboards (JSON) to a directory.",
                       description="Generate tokenmill's Grafana dashboards (overview, latency, KV cache, "
                                   "scheduler, speculative decoding, gateway) from code, for Grafana's "
                                   "dashboard provisioning or import. Needs grafana-foundation-sdk.")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                   help="Where the JSON files go. (default: %(default)s)")
    p.add_argument("--check", action="store_true",
                   help="Write nothing; exit 1 if the files in --output-dir differ from the generator's.")
    p.set_defaults(func=run_dashboards_command)


def run_dashboards_command(args: argparse.Namespace) -> int:
    try:
        rendered = render_dashboards()
    except ModuleNotFoundError as e:
        if e.name != "grafana_foundation_sdk" and not (e.name or "").startswith("grafana_foundation_sdk."):
            raise
        print(f"tokenmill dashboards needs Grafana's SDK (Python 3.11+): pip install '{SDK_REQUIREMENT}'",
              file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    if args.check:
        changes = differences(output_dir, rendered)
        for line in changes:
            print(line, file=sys.stderr)
        if changes:
            print("regenerate with: tokenmill dashboards --output-dir " + str(output_dir), file=sys.stderr)
        return 1 if changes else 0
    for path in write_dashboards(output_dir, rendered):
        print(path)
    return 0
