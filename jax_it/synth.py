"""A generated instruction set in the Alpaca schema whose short answers can be checked exactly.

Every record is {"instruction", "input", "output", "family"}. Each task family has instruction
phrasings for training and others held out for evaluation, so the eval split measures whether a
model follows an instruction it has not seen worded that way, not whether it memorised a string.
Vocabulary is kept small (common English words, numbers below 100) so a 270M model learns fast.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable

from jax_it import scoring

SPLITS = ("train", "eval")

WORDS = (
    "apple", "bird", "book", "car", "cat", "chair", "cloud", "cup", "dog", "door", "fish",
    "flower", "garden", "hat", "house", "lamp", "milk", "moon", "paper", "pen", "rain", "river",
    "road", "shoe", "sky", "snow", "star", "sun", "table", "tree", "water", "window")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "pink", "orange", "gray")
ANIMALS = ("cat", "dog", "horse", "cow", "bird", "fish", "lion", "bear", "duck", "goat")
NAMES = ("Anna", "Ben", "Carl", "Dana", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack",
         "Kate", "Leo", "Mia", "Nina", "Omar", "Paul", "Rosa", "Sam", "Tom", "Zoe")
CITIES = ("Paris", "London", "Rome", "Tokyo", "Berlin", "Madrid", "Cairo", "Lima", "Oslo",
          "Dublin", "Vienna", "Boston", "Sydney", "Delhi", "Seoul")
# Pairs whose opposite is unambiguous in both directions.
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("open", "closed"), ("full", "empty"), ("early", "late"), ("wet", "dry"), ("strong", "weak"),
    ("rich", "poor"), ("loud", "quiet"), ("high", "low"), ("thick", "thin"), ("clean", "dirty"),
    ("true", "false"), ("push", "pull"), ("day", "night"), ("left", "right"), ("yes", "no"),
    ("black", "white"), ("win", "lose"), ("inside", "outside"), ("before", "after"),
    ("north", "south"), ("east", "west"), ("above", "below"), ("always", "never"))
OPPOSITE = {**dict(OPPOSITES), **{b: a for a, b in OPPOSITES}}

# (instruction, input) with str.format placeholders; input None means the record has no input.
Template = tuple[str, "str | None"]


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  # rng -> (placeholder values, exact answer)
  sample: Callable[[random.Random], tuple[dict, str]]
  train: tuple[Template, ...]
  eval: tuple[Template, ...]


def _words(rng: random.Random, lo: int, hi: int, pool=WORDS) -> list[str]:
  return rng.sample(pool, rng.randint(lo, hi))


# ---------------------------------------------------------------------------------------------
# Samplers: placeholder values and the answer


def _add(rng):
  a, b = rng.randint(0, 49), rng.randint(0, 49)
  return {"a": a, "b": b}, str(a + b)


def _subtract(rng):
  a = rng.randint(1, 99)
  b = rng.randint(0, a)
  return {"a": a, "b": b}, str(a - b)


def _multiply(rng):
  a = rng.randint(2, 9)
  b = rng.randint(2, 99 // a)
  return {"a": a, "b": b}, str(a * b)


def _reverse(rng):
  words = _words(rng, 3, 5)
  return {"words": " ".join(words)}, " ".join(reversed(words))


def _sort(rng):
  words = _words(rng, 3, 5)
  return {"words": ", ".join(words)}, ", ".join(sorted(words))


def _count_words(rng):
  words = [rng.choice(WORDS) for _ in range(rng.randint(2, 8))]
  return {"words": " ".join(words)}, str(len(words))


def _count_letter(rng):
  word = rng.choice(WORDS)
  letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
  return {"word": word, "letter": letter}, str(word.count(letter))


def _uppercase(rng):
  text = " ".join(_words(rng, 1, 3))
  return {"text": text}, text.upper()


def _lowercase(rng):
  text = " ".join(_words(rng, 1, 3))
  return {"text": text.upper()}, text


_PERSON_TEXTS = (
    "{name} is {age} years old and lives in {city}.",
    "{name} lives in {city}. {name} is {age} years old.",
    "name: {name}, city: {city}, age: {age}",
    "My friend {name} is from {city} and is {age}.")


def _extract(rng):
  person = {"name": rng.choice(NAMES), "city": rng.choice(CITIES), "age": rng.randint(18, 90)}
  field = rng.choice(("name", "city", "age"))
  text = rng.choice(_PERSON_TEXTS).format(**person)
  return {"field": field, "text": text}, str(person[field])


_JSON_POOLS = {"color": COLORS, "animal": ANIMALS, "city": CITIES, "name": NAMES, "word": WORDS}


def _json(rng):
  key = rng.choice(sorted(_JSON_POOLS))
  value = rng.choice(_JSON_POOLS[key])
  return {"key": key, "value": value}, json.dumps({key: value})


def _comma_list(rng):
  words = _words(rng, 2, 5, COLORS + ANIMALS)
  return {"words": " ".join(words)}, ", ".join(words)


def _first_word(rng):
  words = _words(rng, 3, 6)
  return {"words": " ".join(words)}, words[0]


def _last_word(rng):
  words = _words(rng, 3, 6)
  return {"words": " ".join(words)}, words[-1]


def _repeat(rng):
  word, n = rng.choice(WORDS), rng.randint(2, 5)
  return {"word": word, "n": n}, " ".join([word] * n)


def _next_number(rng):
  step = rng.randint(1, 9)
  start = rng.randint(0, 99 - 4 * step)
  seq = [start + i * step for i in range(4)]
  return {"seq": ", ".join(map(str, seq))}, str(start + 4 * step)


_LARGER = ("larger", "bigger", "greater")
_SMALLER = ("smaller", "lower")


def _compare(rng):
  a, b = rng.sample(range(100), 2)
  rel = rng.choice(_LARGER + _SMALLER)
  return {"a": a, "b": b, "rel": rel}, str(max(a, b) if rel in _LARGER else min(a, b))


def _even_odd(rng):
  n = rng.randint(0, 99)
  return {"n": n}, "odd" if n % 2 else "even"


def _opposite(rng):
  word = rng.choice(sorted(OPPOSITE))
  return {"word": word}, OPPOSITE[word]


# ---------------------------------------------------------------------------------------------
# Families and their phrasings (train / held out for eval)


FAMILIES: tuple[Family, ...] = (
    Family("add", _add, train=(
        ("What is {a} plus {b}?", None),
        ("Add {a} and {b}.", None),
        ("Compute {a} + {b}.", None),
        ("Add the two numbers.", "{a} and {b}"),
    ), eval=(
        ("What do you get when you add {a} to {b}?", None),
        ("Find the sum of these numbers.", "{a}, {b}"),
    )),
    Family("subtract", _subtract, train=(
        ("What is {a} minus {b}?", None),
        ("Subtract {b} from {a}.", None),
        ("Compute {a} - {b}.", None),
        ("Subtract the second number from the first.", "{a} and {b}"),
    ), eval=(
        ("What do you get when you take {b} away from {a}?", None),
        ("Find the difference between the first and the second number.", "{a}, {b}"),
    )),
    Family("multiply", _multiply, train=(
        ("What is {a} times {b}?", None),
        ("Multiply {a} by {b}.", None),
        ("Compute {a} * {b}.", None),
        ("Multiply the two numbers.", "{a} and {b}"),
    ), eval=(
        ("What is the product of {a} and {b}?", None),
        ("Give the result of multiplying these numbers.", "{a}, {b}"),
    )),
    Family("reverse_words", _reverse, train=(
        ("Reverse the order of the words.", "{words}"),
        ("Write these words in reverse order.", "{words}"),
        ("Reverse the order of the words: {words}", None),
    ), eval=(
        ("Put the words in the opposite order.", "{words}"),
        ("List these words from last to first: {words}", None),
    )),
    Family("sort_words", _sort, train=(
        ("Sort these words alphabetically.", "{words}"),
        ("Put the words in alphabetical order.", "{words}"),
        ("Sort the following words from A to Z: {words}", None),
    ), eval=(
        ("Arrange the words in dictionary order.", "{words}"),
        ("Order these words alphabetically: {words}", None),
    )),
    Family("count_words", _count_words, train=(
        ("How many words are in the following text?", "{words}"),
        ("Count the words.", "{words}"),
        ("How many words does this text have: {words}", None),
    ), eval=(
        ("Tell me the number of words in the input.", "{words}"),
        ("Count how many words there are in: {words}", None),
    )),
    Family("count_letter", _count_letter, train=(
        ("How many times does the letter {letter} appear in the word {word}?", None),
        ("Count the letter {letter} in the word.", "{word}"),
        ("How many {letter} letters are in {word}?", None),
    ), eval=(
        ("In the word {word}, how often does the letter {letter} occur?", None),
        ("Give the number of times {letter} appears in the input word.", "{word}"),
    )),
    Family("uppercase", _uppercase, train=(
        ("Convert the text to uppercase.", "{text}"),
        ("Write the input in capital letters.", "{text}"),
        ("Make this uppercase: {text}", None),
    ), eval=(
        ("Rewrite the text using only upper case letters.", "{text}"),
        ("Change to all caps: {text}", None),
    )),
    Family("lowercase", _lowercase, train=(
        ("Convert the text to lowercase.", "{text}"),
        ("Write the input in small letters.", "{text}"),
        ("Make this lowercase: {text}", None),
    ), eval=(
        ("Rewrite the text using only lower case letters.", "{text}"),
        ("Change to all small letters: {text}", None),
    )),
    Family("extract_field", _extract, train=(
        ("What is the {field} in the text? Answer with the {field} only.", "{text}"),
        ("Extract the {field} from the text.", "{text}"),
        ("Give the {field} mentioned here: {text}", None),
    ), eval=(
        ("Read the text and return only its {field}.", "{text}"),
        ("Which {field} does this text mention? {text}", None),
    )),
    Family("json_key", _json, train=(
        ('Return the word as a JSON object with the key "{key}".', "{value}"),
        ('Write a JSON object that maps "{key}" to "{value}".', None),
        ('Format {value} as JSON under the key "{key}".', None),
    ), eval=(
        ('Wrap the input in a JSON object using the key "{key}".', "{value}"),
        ('Give JSON with the key "{key}" and the value "{value}".', None),
    )),
    Family("comma_list", _comma_list, train=(
        ("Rewrite the words as a comma-separated list.", "{words}"),
        ("Separate these words with commas.", "{words}"),
        ("Put commas between these words: {words}", None),
    ), eval=(
        ("Turn the words into a list separated by commas.", "{words}"),
        ("Join these words with commas: {words}", None),
    )),
    Family("first_word", _first_word, train=(
        ("What is the first word of the text?", "{words}"),
        ("Give the first word.", "{words}"),
        ("Which word comes first in: {words}", None),
    ), eval=(
        ("Return only the word at the start of the input.", "{words}"),
        ("Tell me the opening word of: {words}", None),
    )),
    Family("last_word", _last_word, train=(
        ("What is the last word of the text?", "{words}"),
        ("Give the last word.", "{words}"),
        ("Which word comes last in: {words}", None),
    ), eval=(
        ("Return only the word at the end of the input.", "{words}"),
        ("Tell me the final word of: {words}", None),
    )),
    Family("repeat_word", _repeat, train=(
        ("Repeat the word {word} {n} times.", None),
        ("Write {word} {n} times, separated by spaces.", None),
        ("Repeat the input word {n} times.", "{word}"),
    ), eval=(
        ("Say {word} exactly {n} times.", None),
        ("Output the given word {n} times in a row.", "{word}"),
    )),
    Family("next_number", _next_number, train=(
        ("What number comes next in the sequence {seq}?", None),
        ("Continue the sequence with the next number.", "{seq}"),
        ("Give the next number: {seq}", None),
    ), eval=(
        ("Find the number that follows in this pattern: {seq}", None),
        ("What is the next term of the sequence?", "{seq}"),
    )),
    Family("compare", _compare, train=(
        ("Which number is {rel}, {a} or {b}?", None),
        ("Of the two numbers, give the {rel} one.", "{a} and {b}"),
        ("Tell me the {rel} number: {a} or {b}", None),
    ), eval=(
        ("Between {a} and {b}, which one is {rel}?", None),
        ("Return the {rel} of these numbers.", "{a}, {b}"),
    )),
    Family("even_odd", _even_odd, train=(
        ("Is {n} even or odd?", None),
        ("Say whether the number is even or odd.", "{n}"),
        ("Tell me if {n} is an even or an odd number.", None),
    ), eval=(
        ("Is the number {n} odd or even?", None),
        ("Classify the input number as even or odd.", "{n}"),
    )),
    Family("opposite", _opposite, train=(
        ("What is the opposite of {word}?", None),
        ("Give the opposite of the word.", "{word}"),
        ("Write the antonym of {word}.", None),
    ), eval=(
        ("Name the word that means the opposite of {word}.", None),
        ("Return the antonym of the input word.", "{word}"),
    )),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)


# ---------------------------------------------------------------------------------------------
# Public API


def _record(family: Family, template: Template, rng: random.Random) -> dict:
  values, answer = family.sample(rng)
  instruction, input_ = template
  return {"instruction": instruction.format(**values),
          "input": "" if input_ is None else input_.format(**values),
          "output": answer, "family": family.name}


def generate(n: int, seed: int = 0, split: str = "train") -> list[dict]:
  """`n` records of `split`, the same for the same (n, seed, split); families equally often."""
  if split not in SPLITS:
    raise ValueError(f"synth split {split!r} is not one of {', '.join(SPLITS)}")
  if n < 0:
    raise ValueError(f"synth record count must be >= 0, got {n}")
  # Distinct streams per split, so eval records are not a prefix-shifted copy of train ones.
  rng = random.Random(f"jax_it.synth/{seed}/{split}")
  records = []
  for i in range(n):
    family = FAMILIES[i % len(FAMILIES)]
    records.append(_record(family, rng.choice(getattr(family, split)), rng))
  rng.shuffle(records)
  return records


def answer(record: dict) -> str:
  return record["output"]


def is_correct(record: dict, response: str) -> bool:
  """Whether `response` is exactly the record's answer, ignoring surrounding whitespace."""
  return scoring.strict(answer(record), response)
