"""Does tokenizing a long prompt stall the event loop? The measurement behind
PromptEncoder (src/tokenmill/server/prompt_encoder.py) and docs/server.md "Tokenization".

    python tests/server/bench_encode_gil.py [--model DIR] [--chars 200000] [--seconds 2]

A Python thread spins (standing in for the event loop) while another thread tokenizes a
long text over and over, first with `tokenizers`' `encode` (what Tokenizer.encode calls),
then with `encode_batch` (what PromptEncoder hands to its thread). Reported: the spinner's
speed as a fraction of its speed alone; near 0 means the tokenizer held the GIL. Then the
time to encode a prompt just under PromptEncoder's inline limit, on the event loop itself.

Not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

from tokenmill.config import DEMO_MODEL_DIR
from tokenmill.server.prompt_encoder import INLINE_ENCODE_CHARS
from tokenmill.tokenizer import Tokenizer

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


def spin_rate(seconds: float, busy: threading.Event | None = None) -> float:
    """Loop iterations per second of a pure-Python loop on this thread."""
    if busy is not None:
        busy.wait()
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        count += 1
    return count / seconds


def rate_while(work, seconds: float) -> float:
    """The spinner's rate while `work()` runs again and again on another thread."""
    stop, started = threading.Event(), threading.Event()

    def worker() -> None:
        started.set()
        while not stop.is_set():
            work()

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        return spin_rate(seconds, started)
    finally:
        stop.set()
        t.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEMO_MODEL_DIR, help="checkpoint directory (its tokenizer)")
    p.add_argument("--corpus", default=str(CORPUS))
    p.add_argument("--chars", type=int, default=200_000)
    p.add_argument("--seconds", type=float, default=2.0)
    args = p.parse_args()

    tokenizer = Tokenizer.from_dir(args.model)
    backend = tokenizer.backend
    text = Path(args.corpus).read_text()[: args.chars]
    alone = spin_rate(args.seconds)
    with_encode = rate_while(lambda: backend.encode(text), args.seconds)
    with_batch = rate_while(lambda: backend.encode_batch([text]), args.seconds)
    print(f"spinner speed while another thread tokenizes {len(text)} characters:")
    print(f"  encode:       {with_encode / alone:6.1%} of its speed alone")
    print(f"  encode_batch: {with_batch / alone:6.1%} of its speed alone")

    short = text[: INLINE_ENCODE_CHARS - 1]
    times = []
    for _ in range(200):
        start = time.perf_counter()
        tokenizer.encode(short)
        times.append(time.perf_counter() - start)
    print(f"inline encode of {len(short)} characters: median {statistics.median(times) * 1e3:.3f} ms, "
          f"max {max(times) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
