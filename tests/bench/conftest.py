"""Shared fixtures of the bench tests: a real `tokenizers` word tokenizer built in-test, a
history database path, and an HTML parser for the reports."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from tokenmill.bench.tokenizer import HFTokenizer


def build_word_tokenizer(path) -> str:
    """A WordLevel tokenizer over "t0".."t499" (+ [UNK], [BOS]); saved as tokenizer.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"t{i}": i + 1 for i in range(500)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens([AddedToken("[BOS]", special=True)])
    file = path / "tokenizer.json"
    tok.save(str(file))
    return str(file)


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory) -> HFTokenizer:
    return HFTokenizer(build_word_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "bench.db"


class ParsedHTML(HTMLParser):
    """Start tags (name, attributes) and text of an HTML document."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(html)

    @property
    def tag_names(self) -> list[str]:
        return [t for t, _ in self.tags]

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture
def parse_html():
    return ParsedHTML
