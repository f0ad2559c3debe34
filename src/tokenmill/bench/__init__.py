"""The bench lab: load generation against OpenAI-compatible servers, offline engine throughput,
a SQLite history keyed by hardware, regression verdicts, cost per 1M tokens, HTML reports.

Entry points: `tokenmill bench ...` (cli.py), `run_serve` (serve.py), `run_throughput`
(throughput.py), `compare_runs` (compare.py), `Store` (store.py). See docs/bench.md.
"""
