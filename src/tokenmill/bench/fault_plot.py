"""One PNG per fault run: the main derived signals against seconds from the injection, with
the injection, the removal and the watcher's first report marked. Needs matplotlib (imported
here only, so the harness runs without it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenmill.bench.fault_report import FaultOutcome
from tokenmill.bench.fault_signals import SIGNALS_BY_NAME, derive
from tokenmill.observability.metrics_source import Snapshot

# (panel title, signals drawn in it); a panel whose signals have no data is left out.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("requests", ("running", "waiting")),
    ("tokens/s", ("prompt_tokens_per_s", "generation_tokens_per_s")),
    ("TTFT, queue time (s, 5 s mean)", ("ttft_mean_s", "queue_mean_s")),
    ("ITL (s, 5 s mean)", ("itl_mean_s",)),
    ("KV cache", ("kv_usage",)),
    ("preemptions/s", ("preemptions_per_s",)),
    ("server CPU (s/s)", ("cpu_s_per_s",)),
    ("requests ended/s", ("finished_per_s", "aborts_per_s", "http_499_per_s", "http_5xx_per_s")),
    ("engine finished - HTTP 200", ("finished_minus_http_200",)),
    ("gateway", ("gw_backends_healthy", "gw_retries_per_s", "gw_5xx_per_s", "up_min")),
)


def plot_outcome(outcome: FaultOutcome, snapshots: Sequence[Snapshot], path: Path) -> Path:
    """Draw the run; returns `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    zero = outcome.injected_at_s if outcome.injected_at_s is not None else outcome.started_at_s
    drawn = []
    for title, names in PANELS:
        lines = [(n, derive(snapshots, SIGNALS_BY_NAME[n])) for n in names]
        lines = [(n, s) for n, s in lines if s and any(v for _, v in s)]
        if lines:
            drawn.append((title, lines))
    num_cols = 3
    num_rows = max(1, -(-len(drawn) // num_cols))
    fig, axes = plt.subplots(num_rows, num_cols, figsize=(5 * num_cols, 2.8 * num_rows), sharex=True, squeeze=False)
    marks = [(outcome.injected_at_s, "injected", "tab:red", "-"), (outcome.removed_at_s, "removed", "tab:green", "-")]
    first = outcome.first_report
    if first is not None:
        marks.append((float(first["reported_at_s"]), f"watch: {first.get('cause')}", "tab:purple", "--"))
    for ax, (title, lines) in zip(axes.flat, drawn):
        for name, series in lines:
            ax.plot([t - zero for t, _ in series], [v for _, v in series], label=name, linewidth=1)
        for at, label, color, style in marks:
            if at is not None:
                ax.axvline(at - zero, color=color, linestyle=style, linewidth=1, label=label)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("seconds from injection" if outcome.injected_at_s is not None else "seconds", fontsize=8)
    fig.suptitle(f"{outcome.fault}: {outcome.description}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
