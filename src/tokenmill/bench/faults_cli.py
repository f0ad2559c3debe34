"""`tokenmill bench faults` flags and handler (the harness itself is faults.py)."""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from tokenmill.bench.fault_report import CLEAN, FAULTS
from tokenmill.bench.tokenizer import DEMO_MODEL_DIR

EXIT_MISSED = 1  # the watcher missed a fault, named the wrong cause, or raised a false alarm


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fault", default="all", metavar="NAME[,NAME]",
                   help=f"Faults to inject, comma-separated: {', '.join(FAULTS)}; all (the five); clean "
                        "(steady load, no fault: counts false alarms). Default: all.")
    p.add_argument("--model", default="demo", metavar="demo|default|PATH",
                   help="demo: the bundled demo model (fast); default: SmolLM2-135M-Instruct (realistic, "
                        "slower: lighter loads); or a checkpoint folder / GGUF file, loaded like 'default'. "
                        "(default: demo)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="Tokenizer of the model for the random prompts (default: the model's).")
    p.add_argument("--request-rate", type=float, default=None, metavar="R",
                   help="Steady load, requests/s, Poisson (default: the model's preset, about half of "
                        "what a 2-core machine serves).")
    p.add_argument("--warmup-s", type=float, default=90.0, metavar="S",
                   help="Steady load before the injection: the watcher's learning time (default %(default)s).")
    p.add_argument("--fault-s", type=float, default=45.0, metavar="S",
                   help="How long the fault lasts (default %(default)s).")
    p.add_argument("--after-s", type=float, default=30.0, metavar="S",
                   help="Steady load after the removal: the recovery (default %(default)s).")
    p.add_argument("--clean-minutes", type=float, default=5.0, metavar="M",
                   help="Length of the clean run (default %(default)s).")
    p.add_argument("--interval-s", type=float, default=1.0, metavar="S",
                   help="Scrape interval of the recorder and of tokenmill watch (default %(default)s).")
    p.add_argument("--record-dir", default=None, metavar="DIR",
                   help="Write each run's metrics as DIR/<fault>.jsonl.gz and the injection and removal times "
                        "to DIR/faults.json (e.g. tests/observability/data).")
    p.add_argument("--keep-disturbed", action="store_true",
                   help="Copy a run to --record-dir even when other processes took CPU during it (by default "
                        "such a run stays in the work dir: its signals may show them, not the fault).")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="Write DIR/<fault>.png: the main signals around the fault, with the injection, the "
                        "removal and the watcher's first report marked (needs matplotlib).")
    p.add_argument("--slow-readers-hold", action="store_true",
                   help="slow_readers: clients keep their connections until the fault is removed instead of "
                        "hanging up mid-stream (the kernel buffers whole responses: nothing shows in /metrics).")
    p.add_argument("--no-watch", dest="watch", action="store_false",
                   help="Record only; do not start tokenmill watch.")
    p.add_argument("--watch-args", default="", metavar="'ARGS'",
                   help="Further `tokenmill watch` flags, in one quoted string.")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="Server, gateway and watcher logs and incident logs (default: a new temporary folder).")
    p.add_argument("--output", "-o", default=None, metavar="FILE", help="Also write the Markdown report to FILE.")


def parse_faults(text: str) -> list[str]:
    """'all' -> the five faults; names may be comma-separated and may include clean."""
    out: list[str] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        names = list(FAULTS) if name == "all" else [name]
        for n in names:
            if n not in (*FAULTS, CLEAN):
                raise ValueError(f"unknown fault {n!r}; one of {', '.join((*FAULTS, CLEAN, 'all'))}")
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError("--fault names no fault")
    return out


def resolve_model(name: str, tokenizer: str | None) -> tuple[str, str, str]:
    """(checkpoint, tokenizer path, preset name) for --model."""
    if name == "demo":
        return str(DEMO_MODEL_DIR), tokenizer or str(DEMO_MODEL_DIR), "demo"
    if name == "default":
        from tokenmill.model.default_model import default_model_path

        path = str(default_model_path())
        return path, tokenizer or path, "default"
    if not Path(name).exists():
        raise ValueError(f"--model {name}: no such file or folder (or use demo / default)")
    return name, tokenizer or name, "default"


def cmd_faults(args: argparse.Namespace) -> int:
    # Here, not at the top: every `tokenmill bench` command builds this parser.
    from tokenmill.bench.fault_injectors import PRESETS
    from tokenmill.bench.fault_report import markdown
    from tokenmill.bench.faults import FaultsSpec, run_faults, stderr_say, with_rate

    try:
        faults = parse_faults(args.fault)
        model, tokenizer, preset = resolve_model(args.model, args.tokenizer)
        if args.plot and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib: pip install matplotlib")
        if min(args.warmup_s, args.fault_s, args.after_s, args.clean_minutes, args.interval_s) <= 0:
            raise ValueError("--warmup-s, --fault-s, --after-s, --clean-minutes and --interval-s must be > 0")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loads = with_rate(PRESETS[preset], args.request_rate)
    if args.slow_readers_hold:
        loads = replace(loads, slow_readers=replace(loads.slow_readers, give_up_after_s=None))
    spec = FaultsSpec(model=model, tokenizer=tokenizer, loads=loads,
                      warmup_s=args.warmup_s, fault_s=args.fault_s, after_s=args.after_s,
                      clean_s=args.clean_minutes * 60, interval_s=args.interval_s,
                      record_dir=Path(args.record_dir) if args.record_dir else None,
                      keep_disturbed=args.keep_disturbed,
                      plot_dir=Path(args.plot) if args.plot else None, use_watch=args.watch,
                      watch_args=tuple(shlex.split(args.watch_args)),
                      **({"workdir": Path(args.workdir)} if args.workdir else {}))
    spec.workdir.mkdir(parents=True, exist_ok=True)
    stderr_say(f"logs in {spec.workdir}")
    try:
        outcomes = run_faults(faults, spec, stderr_say)
    except KeyboardInterrupt:  # the servers were stopped on the way out
        stderr_say("interrupted")
        return 130
    report = markdown(outcomes)
    sys.stdout.write(report)
    if args.output:
        Path(args.output).write_text(report)
    missed = [o for o in outcomes if o.watch_ran and (o.false_alarms or (o.injected_at_s is not None
                                                                         and not o.is_correct))]
    return EXIT_MISSED if missed else 0
