"""Workloads for speculative decoding: `grounded` (the answer is mostly in the prompt) and
`chat` (it is not).

grounded: an instruction plus a passage to repeat, edit, reformat, continue or summarise
with quotes. Passages come from data that is always there at run time, never a download:
the installed `tokenmill` package's own .py files (code, and their docstrings as prose),
plus an optional user text file. Proposers that look up the prompt (ngram) or a draft model
that can copy shine here; chat measures them where the answer must be invented.

chat: short open questions and writing tasks, built from word lists in this file.

Both are endless and seeded like the other workloads. A passage is a window of whole lines
starting where a definition, docstring or paragraph starts, cut so that the whole prompt
(instruction + passage) fits `input_len` tokens; windows may run on into the next file (and
from the last file to the first).
The package's source is part of the workload, so prompts change when tokenmill's code does:
compare runs of one installed version.
"""

from __future__ import annotations

import ast
import functools
import re
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_INPUT_LEN = 32  # below this the instruction leaves no room for a passage

# (task, instruction). {old}/{new}: an identifier of the passage and its new name.
CODE_TASKS = (
    ("copy", "Repeat the following Python code exactly, without any changes."),
    ("comment", "Rewrite the following Python code and add a short comment before every function. "
                "Keep the code itself unchanged."),
    ("rename", "Rewrite the following Python code, renaming `{old}` to `{new}` everywhere. Change nothing else."),
    ("reformat", "Rewrite the following Python code using two spaces for indentation instead of four."),
    ("continue", "Continue the following Python code."),
)
PROSE_TASKS = (
    ("copy", "Repeat the following text word for word."),
    ("proofread", "Proofread the following text: rewrite it with correct spelling and punctuation, "
                  "changing as little as possible."),
    ("bullets", "Rewrite the following text as a bulleted list, one sentence per bullet, keeping the wording."),
    ("quote", "Summarise the following text in two or three sentences, quoting its most important "
              "sentence word for word."),
    ("continue", "Continue the following text."),
)

CHAT_TEMPLATES = (
    "Write a short poem about {topic}.",
    "Explain {concept} to a ten-year-old.",
    "Give me three tips for {activity}.",
    "Write a short story about a {adjective} {animal} who wants to {goal}.",
    "What are the pros and cons of {choice}?",
    "Describe a day in the life of a {job}.",
    "Write a friendly message inviting a friend to {event}.",
    "Suggest a name for a {adjective} {business} and explain your choice.",
)
CHAT_WORDS = {
    "topic": ("the sea", "autumn leaves", "a city at night", "an old bicycle", "the first snow", "friendship",
              "a lighthouse", "morning coffee", "a thunderstorm", "the moon"),
    "concept": ("gravity", "photosynthesis", "how vaccines work", "inflation", "the water cycle",
                "electricity", "how computers store numbers", "why we dream", "recycling", "time zones"),
    "activity": ("learning a new language", "sleeping better", "running a first marathon", "saving money",
                 "cooking for friends", "studying for exams", "working from home", "starting a garden",
                 "public speaking", "travelling on a budget"),
    "adjective": ("curious", "tiny", "grumpy", "brave", "sleepy", "clever", "clumsy", "cheerful"),
    "animal": ("fox", "penguin", "turtle", "owl", "cat", "elephant", "squirrel", "dolphin"),
    "goal": ("fly", "find a lost treasure", "win a baking contest", "see the ocean", "learn to sing",
             "make a new friend", "climb a mountain", "open a bakery"),
    "choice": ("working from home", "electric cars", "living in a big city", "owning a dog", "online classes",
               "a four-day work week", "renting instead of buying a home", "social media"),
    "job": ("lighthouse keeper", "nurse", "baker", "astronaut", "farmer", "librarian", "pilot", "teacher"),
    "event": ("a picnic", "a board game night", "a birthday dinner", "a hike", "a concert", "a book club"),
    "business": ("bakery", "bookshop", "bike repair shop", "coffee stand", "flower shop", "tea room"),
}
_FIELD = re.compile(r"{(\w+)}")
_IDENTIFIER = re.compile(r"\b[a-z_][a-z0-9_]{3,}\b")
_NOT_RENAMED = frozenset({"self", "none", "true", "false", "return", "import", "from", "class", "def", "with",
                          "while", "yield", "lambda", "print", "list", "dict", "tuple", "float", "elif", "else",
                          "pass", "break", "continue", "raise", "assert", "async", "await", "global", "range",
                          "isinstance", "super", "annotations", "__future__", "__init__", "__name__", "typing"})


@dataclass(frozen=True)
class Document:
    """Lines a passage window is cut from, and the lines a window may start at."""

    kind: str  # "code" | "prose"
    lines: tuple[str, ...]
    start_lines: tuple[int, ...]  # indexes into lines


@dataclass(frozen=True)
class GroundedPrompt:
    """One grounded request before it becomes a RequestSpec."""

    text: str  # instruction + passage, as sent
    passage: str
    task: str  # a name from CODE_TASKS / PROSE_TASKS


def package_root() -> Path:
    """The installed tokenmill package folder (its .py files are the built-in corpus)."""
    import tokenmill

    return Path(tokenmill.__file__).resolve().parent


@functools.lru_cache(maxsize=4)
def package_documents(root: Path | None = None) -> tuple[Document, Document]:
    """(code, prose) documents of a package: every .py file's lines, and every docstring of
    at least 8 words, each in file order. Files that do not parse are skipped."""
    code_lines: list[str] = []
    code_starts: list[int] = []
    prose_lines: list[str] = []
    prose_starts: list[int] = []
    for path in sorted((root or package_root()).rglob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        base = len(code_lines)
        code_lines += [*source.splitlines(), ""]
        nodes = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                                      ast.AsyncFunctionDef))),
                       key=lambda n: getattr(n, "lineno", 0))
        for node in nodes:
            if not isinstance(node, ast.Module):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                code_starts.append(base + first - 1)
            doc = ast.get_docstring(node)
            if doc and len(doc.split()) >= 8:
                prose_starts.append(len(prose_lines))
                prose_lines += [*doc.splitlines(), ""]
    if not code_starts or not prose_starts:
        raise RuntimeError(f"no Python source found under {root or package_root()} for the grounded workload")
    return (Document("code", tuple(code_lines), tuple(code_starts)),
            Document("prose", tuple(prose_lines), tuple(prose_starts)))


def text_document(path: str | Path) -> Document:
    """A user's plain-text file: windows start at paragraphs (after a blank line), or at any
    line when the file has no blank lines."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() and (i == 0 or not lines[i - 1].strip())]
    if len(starts) < 2:
        starts = [i for i, line in enumerate(lines) if line.strip()]
    if not starts:
        raise ValueError(f"{path}: no text for the grounded workload")
    return Document("prose", tuple(lines), tuple(starts))


def render(kind: str, instruction: str, passage: str) -> str:
    """The prompt text. Code goes in a fenced block: small chat models copy it more faithfully."""
    if kind == "code":
        return f"{instruction}\n\n```python\n{passage}\n```"
    return f"{instruction}\n\n{passage}"


def _rename_pair(passage: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """An identifier used at least twice in the passage, and its new name."""
    counts: dict[str, int] = {}
    for word in _IDENTIFIER.findall(passage):
        counts[word] = counts.get(word, 0) + 1
    names = sorted(w for w, n in counts.items() if n >= 2 and w not in _NOT_RENAMED)
    if not names:
        return None
    old = names[int(rng.integers(len(names)))]
    return old, old + ("v2" if old.endswith("_") else "_v2")


def _window(doc: Document, start: int, instruction: str, encode: Callable[[str], list[int]],
            input_len: int) -> str:
    """The most whole lines from `start` whose prompt still fits input_len (galloping, then
    bisection: a few tokenizations per prompt even for long budgets); a first line too long
    on its own is cut by words; "" when not even one word fits."""
    def fits(passage: str) -> bool:
        return len(encode(render(doc.kind, instruction, passage))) <= input_len

    def text(num_lines: int) -> str:
        # Past the end the window wraps to the start, so a late start still fills its budget.
        lines = doc.lines[start:start + num_lines] + doc.lines[:max(0, start + num_lines - len(doc.lines))]
        joined = "\n".join(lines).strip("\n")
        return textwrap.dedent(joined) if doc.kind == "code" else joined

    def fits_lines(num_lines: int) -> bool:
        return fits(text(num_lines))

    room = len(doc.lines)
    lo, hi = 0, 1  # fits_lines(lo) holds (0 lines: the empty passage)
    while hi <= room and fits_lines(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, room + 1)
    while hi - lo > 1:  # invariant: lo fits, hi does not (or is past the end)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits_lines(mid) else (lo, mid)
    if text(lo).strip():
        return text(lo)
    words = doc.lines[start].split()
    lo, hi = 0, len(words) + 1  # bisection over the words of the first line ("" if none fits)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(" ".join(words[:mid])) else (lo, mid)
    return " ".join(words[:lo])


def grounded_prompts(documents: list[Document], encode: Callable[[str], list[int]], input_len: int,
                     rng: np.random.Generator) -> Iterator[GroundedPrompt]:
    """Endless grounded prompts of at most input_len tokens (by `encode`).

    Args:
        documents: where passages come from; one is picked uniformly per prompt.
        encode: text -> token ids (the client tokenizer).
        input_len: token budget of the whole prompt, instruction included.
        rng: the workload's generator.

    Returns:
        An iterator of GroundedPrompt.
    """
    if input_len < MIN_INPUT_LEN:
        raise ValueError(f"grounded_input_len must be >= {MIN_INPUT_LEN}, got {input_len}")
    num_misses = 0
    while True:
        doc = documents[int(rng.integers(len(documents)))]
        start = doc.start_lines[int(rng.integers(len(doc.start_lines)))]
        tasks = CODE_TASKS if doc.kind == "code" else PROSE_TASKS
        task, instruction = tasks[int(rng.integers(len(tasks)))]
        if task == "rename":
            # The identifier comes from the passage, so size the window with a long placeholder.
            probe = instruction.format(old="x" * 24, new="x" * 27)
            pair = _rename_pair(_window(doc, start, probe, encode, input_len), rng)
            task, instruction = tasks[0] if pair is None else (task, instruction.format(old=pair[0], new=pair[1]))
        passage = _window(doc, start, instruction, encode, input_len)
        if not passage and task != "copy":  # a long instruction left no room: the shortest one
            task, instruction = tasks[0]
            passage = _window(doc, start, instruction, encode, input_len)
        if not passage:  # not even one word of this start fits: draw another
            num_misses += 1
            if num_misses >= 100:
                raise ValueError(f"grounded_input_len {input_len} leaves no room for a passage with this "
                                 "tokenizer; raise it")
            continue
        num_misses = 0
        yield GroundedPrompt(render(doc.kind, instruction, passage), passage, task)


def chat_prompts(rng: np.random.Generator) -> Iterator[str]:
    """Endless short open questions and writing tasks (answers not in the prompt)."""
    while True:
        template = CHAT_TEMPLATES[int(rng.integers(len(CHAT_TEMPLATES)))]
        words = {f: CHAT_WORDS[f][int(rng.integers(len(CHAT_WORDS[f])))] for f in _FIELD.findall(template)}
        yield template.format(**words)
