"""Structured output through the official openai client on the real model: every
constrained output is parsed and validated (pydantic, json, re), none sampled away."""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Annotated, Literal

import openai
import pytest
from pydantic import BaseModel, Field
from server_harness import MODEL_NAME, serve_real_model

pytestmark = pytest.mark.usefixtures("requires_cpu_kernels")


server = pytest.fixture(serve_real_model, scope="module", name="server")


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=120)
    favourite_colors: list[Color] = Field(min_length=1, max_length=3)


class Address(BaseModel):
    street: str = Field(max_length=40)
    city: str = Field(max_length=30)
    postcode: str = Field(pattern=r"^[0-9]{5}$")


class Company(BaseModel):
    name: str = Field(max_length=30)
    address: Address  # a nested object: pydantic writes it as $defs + $ref
    employees: int = Field(ge=1, le=100000)
    public: bool


class Recipe(BaseModel):
    title: str = Field(max_length=40)
    servings: int = Field(ge=1, le=12)
    ingredients: list[str] = Field(min_length=2, max_length=5)
    vegetarian: bool
    difficulty: Literal["easy", "medium", "hard"]


class Measurement(BaseModel):
    sensor: str = Field(max_length=20)
    celsius: float = Field(ge=-50, le=60)
    note: str | None = Field(default=None, max_length=40)


class Book(BaseModel):
    title: str = Field(max_length=40)
    author: str = Field(max_length=30)
    year: int = Field(ge=1450, le=2030)
    tags: list[str] = Field(default_factory=list, max_length=3)


class Point(BaseModel):
    x: float = Field(ge=-100, le=100)
    y: float = Field(ge=-100, le=100)


class Route(BaseModel):
    name: str = Field(max_length=20)
    points: list[Point] = Field(min_length=2, max_length=4)  # an array of $ref objects


class Answer(BaseModel):
    answer: Literal["yes", "no", "unknown"]
    confidence: float = Field(ge=0, le=1)


class Event(BaseModel):
    title: str = Field(max_length=30)
    date: str = Field(pattern=r"^20[0-9]{2}-[01][0-9]-[0-3][0-9]$")
    attendees: int = Field(ge=0, le=500)
    online: bool


class Inventory(BaseModel):
    item: str = Field(max_length=20)
    quantity: int = Field(ge=0, le=1000)
    unit: Literal["kg", "pieces", "litres"]
    supplier: Address | None = None  # optional nested object


class Tags(BaseModel):
    tags: list[Literal["news", "sport", "tech", "art"]] = Field(min_length=1, max_length=4)


class Score(BaseModel):
    player: str = Field(max_length=20)
    points: int = Field(ge=0, le=100)
    rank: int = Field(ge=1, le=10)


class Priority(str, Enum):
    low = "low"
    high = "high"


class Task(BaseModel):
    title: str = Field(max_length=30)
    priority: Priority
    done: bool


class TodoList(BaseModel):
    owner: str = Field(max_length=20)
    tasks: list[Task] = Field(min_length=1, max_length=3)


class Contact(BaseModel):
    name: str = Field(max_length=30)
    email: str = Field(pattern=r"^[a-z]{1,10}@[a-z]{1,10}\.(com|org)$")
    phone: str | None = Field(default=None, pattern=r"^\+[0-9]{6,12}$")


class Product(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{3}-[0-9]{4}$")
    price: float = Field(gt=0, le=10000)
    in_stock: bool
    colors: list[Color] = Field(max_length=3)


class Coordinates(BaseModel):
    latitude: float = Field(ge=-90, le=90)
    longitude: float = Field(ge=-180, le=180)


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int = Field(ge=0, le=40_000_000)
    location: Coordinates


class Review(BaseModel):
    product: str = Field(max_length=30)
    stars: int = Field(ge=1, le=5)
    pros: list[Annotated[str, Field(max_length=40)]] = Field(min_length=1, max_length=2)
    cons: list[Annotated[str, Field(max_length=40)]] = Field(max_length=2)


class Flight(BaseModel):
    number: str = Field(pattern=r"^[A-Z]{2}[0-9]{2,4}$")
    origin: str = Field(pattern=r"^[A-Z]{3}$")
    destination: str = Field(pattern=r"^[A-Z]{3}$")
    seats_left: int = Field(ge=0, le=300)


class Matrix(BaseModel):
    # nested arrays, bounded as the question asks (2x2, small): an unbounded schema lets a
    # model write numbers forever, and whether it stops then depends on the CPU's rounding.
    rows: list[Annotated[list[Annotated[int, Field(ge=-99, le=99)]], Field(min_length=2, max_length=2)]] = Field(
        min_length=2, max_length=2)


class Sentiment(BaseModel):
    text: str = Field(max_length=60)
    label: Literal["positive", "negative", "neutral"]
    score: float = Field(ge=-1, le=1)


class Employee(BaseModel):
    name: str = Field(max_length=30)
    title: str = Field(max_length=30)
    manager: str | None = Field(default=None, max_length=30)
    skills: list[str] = Field(min_length=1, max_length=3)


class Team(BaseModel):
    name: str = Field(max_length=20)
    members: list[Employee] = Field(min_length=1, max_length=2)  # $ref objects holding optionals


class Translation(BaseModel):
    source_language: Literal["en", "fr", "de", "es"]
    target_language: Literal["en", "fr", "de", "es"]
    text: str = Field(max_length=60)


class Invoice(BaseModel):
    invoice_id: int = Field(ge=1, le=999999)
    customer: Contact
    amount_eur: float = Field(ge=0, le=100000)
    paid: bool


class Weather(BaseModel):
    city: str = Field(max_length=30)
    condition: Literal["sunny", "cloudy", "rain", "snow"]
    high_celsius: int = Field(ge=-40, le=50)
    low_celsius: int = Field(ge=-40, le=50)


class Quiz(BaseModel):
    question: str = Field(max_length=60)
    options: list[Annotated[str, Field(max_length=40)]] = Field(min_length=3, max_length=4)
    correct_index: int = Field(ge=0, le=3)


class Version(BaseModel):
    package: str = Field(pattern=r"^[a-z][a-z0-9-]{1,20}$")
    version: str = Field(pattern=r"^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$")
    yanked: bool


class Chapter(BaseModel):
    title: str = Field(max_length=30)
    pages: int = Field(ge=1, le=100)


class Outline(BaseModel):
    book: str = Field(max_length=30)
    chapters: list[Chapter] = Field(min_length=2, max_length=3)


class Settings(BaseModel):
    theme: Literal["light", "dark"] = "light"
    font_size: int = Field(default=12, ge=8, le=32)
    language: str = Field(default="en", pattern=r"^[a-z]{2}$")


class Nutrition(BaseModel):
    food: str = Field(max_length=20)
    kcal: int = Field(ge=0, le=1000)
    protein_g: float = Field(ge=0, le=100)
    allergens: list[Literal["gluten", "nuts", "milk", "egg"]] = Field(max_length=4)


class Schedule(BaseModel):
    day: Literal["mon", "tue", "wed", "thu", "fri"]
    slots: list[Annotated[str, Field(pattern=r"^[0-2][0-9]:[0-5][0-9]$")]] = Field(min_length=1, max_length=3)


class Poll(BaseModel):
    question: str = Field(max_length=40)
    votes: dict[str, Annotated[int, Field(ge=0, le=99)]] = Field(min_length=2, max_length=3)  # additionalProperties


class Ticket(BaseModel):
    ref: int | str  # anyOf
    severity: Literal[1, 2, 3]
    summary: str = Field(max_length=50)


CASES = [
    (Person, "Describe a person with a name, an age and favourite colors."),
    (Company, "Invent a small company with its address."),
    (Recipe, "Give me a simple pancake recipe."),
    (Measurement, "Report one temperature reading from a kitchen sensor."),
    (Book, "Recommend a classic novel."),
    (Route, "Describe a short walking route as points."),
    (Answer, "Is water wet?"),
    (Event, "Plan a team meeting next year."),
    (Inventory, "Record an item in a shop's stock."),
    (Tags, "Tag an article about a football match."),
    (Score, "Report a game score for one player."),
    (TodoList, "Write a short todo list for tomorrow."),
    (Contact, "Give me a contact card for a colleague."),
    (Product, "Describe a product in a web shop."),
    (City, "Describe a European capital."),
    (Review, "Review a pair of headphones."),
    (Flight, "Describe a flight from Paris to Rome."),
    (Matrix, "Write a 2x2 matrix of small integers."),
    (Sentiment, "Classify the sentiment of: I love this song."),
    (Team, "Describe a small software team."),
    (Translation, "Translate 'good morning' into French."),
    (Invoice, "Write an invoice for a customer."),
    (Weather, "Give tomorrow's weather forecast for Oslo."),
    (Quiz, "Write a quiz question about planets."),
    (Version, "Report the latest version of a Python package."),
    (Outline, "Outline a short book about cooking."),
    (Settings, "Pick settings for a text editor."),
    (Nutrition, "Give the nutrition facts of an apple."),
    (Schedule, "Book two meeting slots on Tuesday."),
    (Poll, "Count the votes of a poll about lunch."),
    (Ticket, "File a bug ticket about a broken login page."),
]


@pytest.mark.parametrize("model, question", CASES, ids=[m.__name__ for m, _ in CASES])
def test_parse_returns_a_validated_object(client, model, question):
    completion = client.chat.completions.parse(
        model=MODEL_NAME, messages=[{"role": "user", "content": question}], response_format=model,
        max_tokens=300, temperature=0.7, seed=3,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, model)  # the SDK parsed and validated it


def test_json_object_mode_and_streaming(client):
    stream = client.chat.completions.create(
        # json_object bounds nothing: a prompt the model answers briefly on every kernel path
        # ("List two fruits as JSON." lists fruits past 200 tokens on some CPUs' rounding).
        model=MODEL_NAME, messages=[{"role": "user", "content": "Give two fruits and their colors as a JSON object."}],
        response_format={"type": "json_object"}, max_tokens=200, temperature=0, stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert isinstance(json.loads(text), dict)


def test_vllm_fields_regex_choice_grammar_on_completions(client):
    prompt = "Call me at"
    cases = [
        ({"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{4}"}}, lambda t: re.fullmatch(r"[0-9]{3}-[0-9]{4}", t)),
        ({"guided_choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
        ({"structured_outputs": {"grammar": 'root ::= "(" [0-9]+ ")"'}}, lambda t: re.fullmatch(r"\(\d+\)", t)),
        ({"guided_json": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999},
                          "minItems": 2, "maxItems": 4}},
         lambda t: 2 <= len(json.loads(t)) <= 4 and all(isinstance(v, int) for v in json.loads(t))),
    ]
    for extra, valid in cases:
        out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=40, temperature=0.8, n=3,
                                        seed=5, extra_body=extra)
        for c in out.choices:
            assert c.finish_reason == "stop" and valid(c.text), (extra, c.text)


@pytest.mark.parametrize("extra, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "invalid JSON schema: Invalid type: foo"),
    ({"structured_outputs": {"regex": "(ab"}}, "invalid regex"),
    ({"guided_json": {"type": "array", "uniqueItems": True}}, 'Unimplemented keys: ["uniqueItems"]'),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one of"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "each ask for structured output"),
    ({"response_format": {"type": "xml"}}, "response_format.type must be"),
])
def test_bad_constraints_are_400s_naming_the_problem(client, extra, message):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=5, extra_body=extra)
    assert message in err.value.body["message"]
    client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)  # still serving


def test_structural_tag_every_trigger_starts_a_valid_structure(client):
    tag = {"type": "structural_tag", "triggers": ["<function="], "structures": [
        {"begin": "<function=get_weather>", "end": "</function>",
         "schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}]}
    prompt = ('Example: <function=get_weather>{"city": "Paris"}</function>\n'
              'Example: <function=get_weather>{"city": "Rome"}</function>\nExample:')
    out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=60, temperature=1.0, n=4, seed=1,
                                    extra_body={"structured_outputs": {"structural_tag": json.dumps(tag)}})
    calls = 0
    for c in out.choices:
        for piece in c.text.split("<function=")[1:]:  # every trigger: the structure, whole
            assert piece.startswith("get_weather>"), c.text
            try:
                value, end = json.JSONDecoder().raw_decode(piece, len("get_weather>"))
            except json.JSONDecodeError:
                assert c.finish_reason == "length", c.text  # cut short, not malformed
                continue
            assert set(value) == {"city"} and len(value["city"]) <= 20, c.text
            assert piece.startswith("</function>", end) or c.finish_reason == "length", c.text
            calls += 1
    assert calls > 0  # the prompt leads the model into the tag
