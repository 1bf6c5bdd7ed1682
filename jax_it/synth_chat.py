"""A generated multi-turn conversation set whose final answer is checked exactly and needs history.

Every record is {"messages": [{"role", "content"}, ...], "family"}: an optional system message,
then 2 or 3 user turns each answered by an assistant turn. Every assistant turn holds the exact
answer to its turn; the last one is graded and depends on an earlier turn (a word to remember, a
list to reverse, a number to add to), so a model that reads only the last question cannot pass.
As in jax_it.synth, every user turn has phrasings for training and others held out for eval, and
the vocabulary is small (synth's words, numbers below 100) so a 270M model learns it fast.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from jax_it import scoring
from jax_it.synth import ANIMALS, COLORS, NAMES, OPPOSITE, WORDS

SPLITS = ("train", "eval")

# None of them changes an answer: they only ask for the short answers every record already has.
SYSTEM_PROMPTS = (
    "You are a concise assistant. Answer with the result only.",
    "You are a helpful assistant. Reply with just the answer.",
    "Answer briefly, with no explanation.",
    "Keep every answer as short as possible.",
)
SYSTEM_RATE = 0.25

# One step of a conversation: (turn key, placeholder values, exact answer).
Step = tuple[str, dict, str]


@dataclasses.dataclass(frozen=True)
class Turn:
  """The str.format phrasings of one kind of user turn."""

  train: tuple[str, ...]
  eval: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  # rng -> 2 or 3 steps; each step's answer may depend on the steps before it
  sample: Callable[[random.Random], list[Step]]
  turns: dict[str, Turn]

  @property
  def train(self) -> tuple[str, ...]:
    """Every training phrasing of every turn."""
    return tuple(t for turn in self.turns.values() for t in turn.train)

  @property
  def eval(self) -> tuple[str, ...]:
    """Every held-out phrasing of every turn."""
    return tuple(t for turn in self.turns.values() for t in turn.eval)


def _join(items) -> str:
  return ", ".join(map(str, items))


# ---------------------------------------------------------------------------------------------
# Samplers: the steps of one conversation and their answers


def _running_sum(rng):
  a, b = rng.randint(1, 30), rng.randint(1, 30)
  total = a + b
  steps = [("sum", {"a": a, "b": b}, str(total))]
  for _ in range(rng.randint(1, 2)):
    c = rng.randint(1, 15)
    total += c
    steps.append(("add", {"c": c}, str(total)))
  return steps


def _times_result(rng):
  d = rng.randint(2, 9)
  a = rng.randint(d + 1, 60)
  c = rng.randint(2, 99 // d)
  steps = [("diff", {"a": a, "b": a - d}, str(d)), ("mul", {"c": c}, str(d * c))]
  if rng.random() < 0.5:
    e = rng.randint(1, min(20, d * c))
    steps.append(("sub", {"e": e}, str(d * c - e)))
  return steps


def _recall_word(rng):
  word = rng.choice(WORDS)
  steps = [("remember", {"word": word}, "OK")]
  if rng.random() < 0.5:  # a distractor between the word and the question about it
    n = rng.randint(0, 99)
    steps.append(("parity", {"n": n}, "odd" if n % 2 else "even"))
  return steps + [("recall", {}, word)]


def _sort_then(rng):
  words = sorted(rng.sample(WORDS, rng.randint(3, 5)))
  steps = [("sort", {"words": _join(rng.sample(words, len(words)))}, _join(words))]
  for op in rng.sample(("reverse", "upper"), rng.randint(1, 2)):
    words = words[::-1] if op == "reverse" else [w.upper() for w in words]
    steps.append((op, {}, _join(words)))
  return steps


def _filter_count(rng):
  kind = rng.choice(("animals", "colors"))
  pool, other = (ANIMALS, COLORS) if kind == "animals" else (COLORS, ANIMALS)
  n = rng.randint(4, 6)
  k = rng.randint(1, n - 2)
  items = rng.sample(pool, k) + rng.sample(other, n - k)
  rng.shuffle(items)
  kept = [w for w in items if w in pool]
  steps = [("filter", {"kind": kind, "items": _join(items)}, _join(kept))]
  if rng.random() < 0.5:
    steps.append(("sort", {}, _join(sorted(kept))))
  return steps + [("count", {}, str(k))]


def _recall_number(rng):
  nums = rng.sample(range(100), rng.randint(3, 5))
  ext = rng.choice(("largest", "smallest"))
  pick = {"largest": max, "smallest": min}
  steps = [("extreme", {"ext": ext, "nums": _join(nums)}, str(pick[ext](nums)))]
  if rng.random() < 0.5:
    other = "smallest" if ext == "largest" else "largest"
    steps.append(("other", {"ext": other}, str(pick[other](nums))))
  pos = rng.choice(("first", "last"))
  return steps + [("recall", {"pos": pos}, str(nums[0] if pos == "first" else nums[-1]))]


def _opposite_upper(rng):
  word = rng.choice(sorted(OPPOSITE))
  steps = [("opposite", {"word": word}, OPPOSITE[word])]
  if rng.random() < 0.5:
    steps.append(("again", {}, word))
  return steps + [("upper", {}, steps[-1][2].upper())]


def _ages(rng):
  people = rng.sample(NAMES, rng.randint(1, 2))
  ages = rng.sample(range(10, 81), len(people))
  steps = [("fact", {"name": p, "age": a}, "OK") for p, a in zip(people, ages)]
  if len(people) == 2 and rng.random() < 0.5:
    return steps + [("older", {}, people[ages.index(max(ages))])]
  i = rng.randrange(len(people))
  return steps + [("ask", {"name": people[i]}, str(ages[i]))]


def _list_edit(rng):
  items = rng.sample(ANIMALS, 2)
  steps = [("start", {"a": items[0], "b": items[1]}, _join(items))]
  for _ in range(rng.randint(1, 2)):
    if len(items) > 1 and rng.random() < 0.4:
      item = rng.choice(items)
      items = [w for w in items if w != item]
      steps.append(("remove", {"item": item}, _join(items)))
    else:
      item = rng.choice([w for w in ANIMALS if w not in items])
      items = items + [item]
      steps.append(("add", {"item": item}, _join(items)))
  return steps


def _sequence_more(rng):
  more = rng.randint(1, 2)
  step = rng.randint(1, 9)
  start = rng.randint(0, 99 - (4 + more) * step)
  seq = [start + i * step for i in range(4)]
  steps = [("next", {"seq": _join(seq)}, str(start + 4 * step))]
  return steps + [("after", {}, str(start + (4 + i) * step)) for i in range(1, more + 1)]


# ---------------------------------------------------------------------------------------------
# Families and their phrasings (train / held out for eval)


FAMILIES: tuple[Family, ...] = (
    Family("running_sum", _running_sum, {
        "sum": Turn(("What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."),
                    ("What do you get when you add {a} to {b}?", "Find the sum of {a} and {b}.")),
        "add": Turn(("Add {c} to that.", "Now add {c}.", "Add {c} to your answer."),
                    ("Increase the result by {c}.", "Take that number and add {c} to it.")),
    }),
    Family("times_result", _times_result, {
        "diff": Turn(("What is {a} minus {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}."),
                     ("What do you get when you take {b} away from {a}?",
                      "Find the difference between {a} and {b}.")),
        "mul": Turn(("Multiply that by {c}.", "Now multiply it by {c}.",
                     "Multiply your answer by {c}."),
                    ("What do you get if you multiply that by {c}?", "Give me that times {c}.")),
        "sub": Turn(("Subtract {e} from that.", "Now subtract {e}.",
                     "Take {e} away from your answer."),
                    ("Decrease the result by {e}.", "What is left if you remove {e} from that?")),
    }),
    Family("recall_word", _recall_word, {
        "remember": Turn(("Remember the word {word}.", "Please remember this word: {word}",
                          "Keep the word {word} in mind."),
                         ("Memorize the word {word} for me.",
                          "Here is a word to remember: {word}")),
        "parity": Turn(("Is {n} even or odd?", "Tell me if {n} is even or odd.",
                        "Say whether {n} is even or odd."),
                       ("Is the number {n} odd or even?", "Classify {n} as even or odd.")),
        "recall": Turn(("Which word did I ask you to remember?",
                        "What was the word I told you to remember?",
                        "Tell me the word you had to remember."),
                       ("What word did I give you to keep in mind?",
                        "Repeat the word I asked you to memorize.")),
    }),
    Family("sort_then", _sort_then, {
        "sort": Turn(("Sort these words alphabetically: {words}",
                      "Put these words in alphabetical order: {words}",
                      "Sort from A to Z: {words}"),
                     ("Arrange these words in dictionary order: {words}",
                      "Order these words alphabetically: {words}")),
        "reverse": Turn(("Now reverse the list you gave me.", "Reverse that list.",
                         "Give me the list in reverse order."),
                        ("Write your list backwards, from last to first.",
                         "Flip the order of that list.")),
        "upper": Turn(("Now write the list in uppercase.", "Make that list uppercase.",
                       "Write the list in capital letters."),
                      ("Change your list to all caps.",
                       "Rewrite that using only upper case letters.")),
    }),
    Family("filter_count", _filter_count, {
        "filter": Turn(("Which of these are {kind}: {items}?", "List the {kind} in: {items}",
                        "Pick out the {kind} from: {items}"),
                       ("Name only the {kind} among: {items}",
                        "From {items}, keep just the {kind}.")),
        "sort": Turn(("Sort that list alphabetically.", "Now put them in alphabetical order.",
                      "Order your list from A to Z."),
                     ("Arrange them in dictionary order.", "Rewrite that list sorted A to Z.")),
        "count": Turn(("How many items are in that list?", "How many words did you give?",
                       "Count the items in your list."),
                      ("What is the length of that list?", "How many things did you name?")),
    }),
    Family("recall_number", _recall_number, {
        "extreme": Turn(("What is the {ext} of these numbers: {nums}?",
                         "Give the {ext} number: {nums}",
                         "Which number is the {ext}: {nums}?"),
                        ("Find the {ext} value among {nums}.",
                         "Out of {nums}, which is the {ext}?")),
        "other": Turn(("And the {ext}?", "What about the {ext} one?",
                       "Now give the {ext} number."),
                      ("Which of them is the {ext}?", "Tell me the {ext} of those numbers.")),
        "recall": Turn(("What was the {pos} number I gave you?",
                        "Which number did I give {pos}?",
                        "Tell me the {pos} number in my list."),
                       ("Remind me of the {pos} number I wrote.",
                        "Repeat the number that came {pos} in what I sent.")),
    }),
    Family("opposite_upper", _opposite_upper, {
        "opposite": Turn(("What is the opposite of {word}?", "Give the opposite of {word}.",
                          "Write the antonym of {word}."),
                         ("Name the word that means the opposite of {word}.",
                          "Which word is the antonym of {word}?")),
        "again": Turn(("What is the opposite of that?", "Now give the opposite of that word.",
                       "And its opposite?"),
                      ("Now flip that word to its opposite.",
                       "Turn your answer into its antonym.")),
        "upper": Turn(("Write that word in uppercase.", "Now write it in capital letters.",
                       "Give me that in uppercase."),
                      ("Spell your answer in all caps.", "Change that word to upper case.")),
    }),
    Family("ages", _ages, {
        "fact": Turn(("My friend {name} is {age} years old.",
                      "Note that {name} is {age} years old.", "Remember: {name} is {age}."),
                     ("{name}'s age is {age}.", "Keep in mind that {name} is aged {age}.")),
        "ask": Turn(("How old is {name}?", "What is {name}'s age?", "Tell me {name}'s age."),
                    ("What age did I say {name} is?", "Remind me how old {name} is.")),
        "older": Turn(("Who is older?", "Which of them is older?", "Who is the older one?"),
                      ("Of the two people, who has more years?", "Name the older person.")),
    }),
    Family("list_edit", _list_edit, {
        "start": Turn(("Start a list with {a} and {b}.", "Make a list of {a} and {b}.",
                       "Begin a list: {a}, {b}"),
                      ("Create a list holding {a} and {b}.",
                       "Write down a list containing {a} and {b}.")),
        "add": Turn(("Add {item} to the list.", "Put {item} at the end of the list.",
                     "Append {item}."),
                    ("Also include {item} at the end.", "Extend the list with {item}.")),
        "remove": Turn(("Remove {item} from the list.", "Take {item} out of the list.",
                        "Delete {item}."),
                       ("Drop {item} from my list.", "Cross {item} off the list.")),
    }),
    Family("sequence_more", _sequence_more, {
        "next": Turn(("What number comes next in the sequence {seq}?",
                      "Give the next number: {seq}",
                      "Continue the sequence with one number: {seq}"),
                     ("Find the number that follows in this pattern: {seq}",
                      "What is the next term of {seq}?")),
        "after": Turn(("And the one after that?", "What comes after that?", "Give the next one."),
                      ("Continue with one more number.", "Which number follows your answer?")),
    }),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)


# ---------------------------------------------------------------------------------------------
# Public API


def _record(family: Family, split: str, rng: random.Random) -> dict:
  messages = []
  if rng.random() < SYSTEM_RATE:
    messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
  for key, values, answer in family.sample(rng):
    template = rng.choice(getattr(family.turns[key], split))
    messages.append({"role": "user", "content": template.format(**values)})
    messages.append({"role": "assistant", "content": answer})
  return {"messages": messages, "family": family.name}


def generate(n: int, seed: int = 0, split: str = "train") -> list[dict]:
  """`n` records of `split`, the same for the same (n, seed, split); families equally often."""
  if split not in SPLITS:
    raise ValueError(f"synth_chat split {split!r} is not one of {', '.join(SPLITS)}")
  if n < 0:
    raise ValueError(f"synth_chat record count must be >= 0, got {n}")
  # Distinct streams per split, and from jax_it.synth's, so no split is a shifted copy of another.
  rng = random.Random(f"jax_it.synth_chat/{seed}/{split}")
  records = [_record(FAMILIES[i % len(FAMILIES)], split, rng) for i in range(n)]
  rng.shuffle(records)
  return records


def answer(record: dict) -> str:
  """The graded answer: the content of the record's last assistant turn."""
  return record["messages"][-1]["content"]


def prompt_messages(record: dict) -> list[dict]:
  """The messages a model is given at evaluation: all before the last (graded) assistant turn."""
  return record["messages"][:-1]


def is_correct(record: dict, response: str) -> bool:
  """Whether `response` is exactly the record's answer, ignoring surrounding whitespace."""
  return scoring.strict(answer(record), response)
