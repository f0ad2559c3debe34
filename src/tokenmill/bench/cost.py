"""Cost per million tokens from measured throughput and a user-editable price table.

$/1M output tokens = usd_per_hour / 3600 / (output tokens/s) * 1e6, and the same with total
(input + output) tokens/s. A serve or throughput run is priced at its measured throughput;
a capacity run at the throughput it sustained at the highest rate that met the SLOs. The
whole instance is charged: one GPU used out of eight is priced as the eight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.bench.schema import RunRecord

BUNDLED_PRICES = Path(__file__).with_name("prices.toml")


def user_prices_path() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "tokenmill" / "prices.toml"


@dataclass(frozen=True)
class PriceTable:
    instances: dict[str, dict[str, Any]]  # name -> {"usd_per_hour", "gpu", "gpu_count", ...}
    as_of: str
    basis: str
    path: str


def load_prices(path: str | Path | None = None) -> PriceTable:
    """Load a price table.

    Args:
        path: a TOML file; None: ~/.config/tokenmill/prices.toml if it exists, else the
            bundled defaults.

    Returns:
        The table.

    Raises:
        ValueError: an entry has no positive usd_per_hour.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError as exc:
            raise RuntimeError("reading prices.toml on Python 3.10 needs `pip install tomli`") from exc
    if path is None:
        path = user_prices_path() if user_prices_path().is_file() else BUNDLED_PRICES
    with open(path, "rb") as f:
        data = tomllib.load(f)
    instances = data.get("instances", {})
    for name, entry in instances.items():
        if not float(entry.get("usd_per_hour", 0)) > 0:
            raise ValueError(f"{path}: instance {name!r} needs a positive usd_per_hour")
    meta = data.get("meta", {})
    return PriceTable(instances, str(meta.get("as_of", "unknown")), str(meta.get("basis", "")), str(path))


def match_instances(run: RunRecord, prices: PriceTable) -> list[str]:
    """Price-table entries that describe a run's hardware.

    The user's --instance-type wins; otherwise GPU runs match every entry whose `gpu` is a
    substring of the GPU name and whose gpu_count equals the number of GPUs. CPU-only runs
    need --instance-type (core counts do not identify an instance).
    """
    if run.instance_type:
        return [run.instance_type] if run.instance_type in prices.instances else []
    gpus = run.hardware.get("gpus") or []
    if not gpus:
        return []
    gpu_name = str(gpus[0].get("name", "")).lower()
    return [
        name for name, e in prices.instances.items()
        if e.get("gpu") and str(e["gpu"]).lower() in gpu_name and int(e.get("gpu_count", 1)) == len(gpus)
    ]


@dataclass(frozen=True)
class CostRow:
    run_id: int | None
    sku: str
    model: str
    instance: str
    usd_per_hour: float
    basis: str  # "measured" or "at SLO capacity (<rate> req/s)"
    output_tokens_per_s: float
    total_tokens_per_s: float
    usd_per_1m_output: float
    usd_per_1m_total: float


def usd_per_million(usd_per_hour: float, tokens_per_s: float) -> float:
    """Dollars per 1M tokens at a throughput; inf when nothing was produced."""
    return usd_per_hour / 3600.0 / tokens_per_s * 1e6 if tokens_per_s > 0 else float("inf")


def cost_rows(runs: list[RunRecord], prices: PriceTable) -> tuple[list[CostRow], list[str]]:
    """Cost of each run on each matching instance.

    Args:
        runs: serve, throughput and capacity runs.
        prices: the price table.

    Returns:
        (rows, notes): notes name the runs that could not be priced and why.
    """
    rows: list[CostRow] = []
    notes: list[str] = []
    for run in runs:
        out_tps = float(run.summary.get("output_throughput") or 0.0)
        total_tps = float(run.summary.get("total_token_throughput") or 0.0)
        basis = "measured"
        if run.kind == "capacity":
            basis = f"at SLO capacity ({float(run.summary.get('capacity_rps', 0.0)):.3g} req/s)"
        matches = match_instances(run, prices)
        if not matches:
            why = (f"--instance-type {run.instance_type!r} is not in the price table" if run.instance_type
                   else "no --instance-type given and no GPU match")
            notes.append(f"run {run.id} ({run.hardware_sku}): not priced, {why}")
        for name in matches:
            usd_h = float(prices.instances[name]["usd_per_hour"])
            rows.append(CostRow(run.id, run.hardware_sku, run.model, name, usd_h, basis, out_tps, total_tps,
                                usd_per_million(usd_h, out_tps), usd_per_million(usd_h, total_tps)))
    return rows, notes
