"""`tokenmill eval ...` argument parsers; handlers are in commands.py. Flag names follow
llama-perplexity where the concept is the same (-c/--ctx-size, --chunks, -f), the engine
flags are `tokenmill generate`'s, the server flags `tokenmill bench serve`'s."""

from __future__ import annotations

import argparse

from tokenmill.bench.quality import commands
from tokenmill.bench.quality.protocol import DEFAULT_CTX_SIZE
from tokenmill.bench.quality.server import DEFAULT_NUM_LOGPROBS

_DB_HELP = ("SQLite history file shared with `tokenmill bench` (default: $TOKENMILL_BENCH_DB, else "
            "~/.local/share/tokenmill/bench.db).")


def fraction(text: str) -> float:
    """'1%' -> 0.01; '0.01' -> 0.01."""
    s = text.strip()
    try:
        return float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a fraction; use e.g. 1% or 0.01") from None


def _add_perplexity(sub: argparse._SubParsersAction) -> None:
    from tokenmill.cli import add_engine_args

    p = sub.add_parser(
        "perplexity", help="Perplexity of a text (llama-perplexity's protocol); KL divergence against a reference.",
        description="Score a text in non-overlapping windows of --ctx-size tokens, the second half of each "
                    "window only (docs/quality.md), and print PPL with its standard error. With --reference, "
                    "also the KL divergence, top-token agreement and PPL ratio against a saved run. Progress "
                    "goes to stderr; the run is stored in the bench history.")
    p.add_argument("--text", "-f", required=True, metavar="FILE", help="UTF-8 text to score.")
    p.add_argument("--ctx-size", "-c", type=int, default=DEFAULT_CTX_SIZE,
                   help="Tokens per window; also the stride (default %(default)s).")
    p.add_argument("--chunks", type=int, default=None, metavar="N",
                   help="Score only the first N windows (default: every full window of the text).")
    p.add_argument("--backend", choices=("tokenmill", "hf", "server"), default=None,
                   help="tokenmill: the engine in this process (default); hf: Hugging Face transformers on "
                        "the same token ids (the reference implementation; float32 unless --dtype); "
                        "server: an OpenAI-compatible server (implied by --base-url).")
    g = p.add_argument_group("reference and KL divergence")
    g.add_argument("--save-logits", default=None, metavar="DIR",
                   help="Save this run's next-token distributions (16-bit log-probs, 2 bytes x vocab per "
                        "scored token) to a new folder, as the reference of later runs.")
    g.add_argument("--reference", "--kl-divergence-base", dest="reference", default=None, metavar="DIR",
                   help="A --save-logits folder: also report KL divergence, same top token and PPL ratio.")
    add_engine_args(p)
    g = p.add_argument_group("server (--base-url)")
    g.add_argument("--base-url", default=None,
                   help="OpenAI-compatible server, with or without /v1; it must return prompt logprobs "
                        "(echo + logprobs on /v1/completions, as tokenmill and vLLM do).")
    g.add_argument("--served-model", default=None, metavar="NAME",
                   help="Model name to request (default: first id of GET /v1/models).")
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="Checkpoint whose tokenizer matches the served model (default: --model, else the "
                        "default model): it makes the windows and maps listed tokens back to ids.")
    g.add_argument("--logprobs", type=int, default=DEFAULT_NUM_LOGPROBS,
                   help="Alternatives per position to ask for; KL divergence covers only these "
                        "(default %(default)s).")
    g.add_argument("--max-concurrency", type=int, default=4, help="Windows in flight (default %(default)s).")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="Per-request timeout in seconds (default %(default)s).")
    g.add_argument("--extra-body", default=None, metavar="JSON",
                   help="JSON object merged into every request, e.g. '{\"return_tokens_as_token_ids\": true}' "
                        "for vLLM.")
    g = p.add_argument_group("results")
    g.add_argument("--db", default=None, metavar="PATH", help=_DB_HELP)
    g.add_argument("--label", default="", help="Free-text label stored with the run.")
    g.add_argument("--hardware-sku", default=None, metavar="NAME",
                   help="Name to file the run under instead of the detected SKU (e.g. the server's).")
    g.add_argument("--json", action="store_true", help="Print the results as JSON on stdout.")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="No progress lines on stderr.")
    p.set_defaults(func=commands.cmd_perplexity)


def add_eval_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register `perplexity`, `compare` and `history` under `tokenmill eval`.

    Args:
        sub: the subparsers of the `eval` parser; each command sets `func`.
    """
    _add_perplexity(sub)

    p = sub.add_parser(
        "compare", help="Quality verdict NEW vs BASE with bootstrap intervals; exit code 1 on a regression.",
        description="BASE and NEW are quality run ids that scored the same windows. PPL ratio with a "
                    "bootstrap interval over windows; with NEW scored against BASE's --save-logits, also "
                    "mean KL divergence and same-top-token fraction. A regression must exceed its threshold "
                    "and its interval must exclude no change.")
    p.add_argument("base", type=int, metavar="BASE", help="Baseline run id.")
    p.add_argument("new", type=int, metavar="NEW", help="Candidate run id.")
    p.add_argument("--max-ppl-increase", type=fraction, default=0.01, metavar="FRACTION",
                   help="Largest acceptable PPL increase, e.g. 1%% or 0.01 (default 1%%).")
    p.add_argument("--max-kld", type=float, default=None, metavar="NATS",
                   help="Largest acceptable mean KL divergence (default: shown, not judged).")
    p.add_argument("--min-same-top", type=fraction, default=None, metavar="FRACTION",
                   help="Smallest acceptable same-top-token fraction, e.g. 99%% (default: shown, not judged).")
    p.add_argument("--confidence", type=float, default=0.95, help="Interval coverage (default %(default)s).")
    p.add_argument("--resamples", type=int, default=10_000, help="Bootstrap resamples (default %(default)s).")
    p.add_argument("--db", default=None, metavar="PATH", help=_DB_HELP)
    p.add_argument("--json", action="store_true", help="Print the checks as JSON on stdout.")
    p.set_defaults(func=commands.cmd_compare)

    p = sub.add_parser("history", help="List stored quality runs, newest first.")
    p.add_argument("--db", default=None, metavar="PATH", help=_DB_HELP)
    p.add_argument("--model", default=None, help="Model name substring.")
    p.add_argument("--sku", default=None, help="Hardware SKU substring.")
    p.add_argument("--limit", type=int, default=50, help="At most this many runs (default %(default)s).")
    p.add_argument("--json", action="store_true", help="Print a JSON array of runs on stdout.")
    p.set_defaults(func=commands.cmd_history)
