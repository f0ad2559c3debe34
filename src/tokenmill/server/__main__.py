"""`python -m tokenmill.server [options]`: the same as `tokenmill serve`, without loading
the rest of the CLI (used by the tests' subprocess server)."""

from __future__ import annotations

import argparse
import sys

from tokenmill.cli import add_engine_args
from tokenmill.server.api_server import run_server
from tokenmill.server.args import add_server_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.server",
                                     description="Serve a model over the OpenAI-compatible HTTP API.")
    add_server_args(parser)
    add_engine_args(parser)
    return run_server(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
