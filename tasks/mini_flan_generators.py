"""Procedurally generated instruction tasks for the built-in `mini_flan` suite.

Pure Python, no TensorFlow: each task is a function `(rng) -> (fields, answer)`
and a set of templates. Splits are deterministic: example `i` of split `s` of
task `t` is drawn from `random.Random(f"{seed}/{t}/{s}/{i}")`, so the same seed
gives the same bytes on every machine and Python version.
"""

import dataclasses
import random
import string
from typing import Callable, Dict, Iterator, List, Mapping, Tuple

SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_SIZES = {"train": 1000, "validation": 100, "test": 100}

Fields = Dict[str, object]
Generator = Callable[[random.Random], Fields]


@dataclasses.dataclass(frozen=True)
class GenTask:
  """A generated task: a cluster, a field generator and its templates.

  The generator returns fields including "answer" (str) and, for
  classification tasks, "options" (a tuple of str containing the answer).
  """
  name: str
  cluster: str
  generate: Generator
  templates: Tuple[str, ...]  # `str.format` patterns over the fields.

  has_options: bool = False


def _word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
  return "".join(rng.choice(string.ascii_lowercase)
                 for _ in range(rng.randint(lo, hi)))


def _ints(rng: random.Random, n_lo=3, n_hi=6, lo=0, hi=99) -> List[int]:
  return [rng.randint(lo, hi) for _ in range(rng.randint(n_lo, n_hi))]


# --- arithmetic -------------------------------------------------------------
def _add(rng):
  a, b = rng.randint(0, 999), rng.randint(0, 999)
  return {"a": a, "b": b, "answer": str(a + b)}


def _subtract(rng):
  a, b = rng.randint(0, 999), rng.randint(0, 999)
  return {"a": a, "b": b, "answer": str(a - b)}


def _multiply(rng):
  a, b = rng.randint(0, 99), rng.randint(0, 99)
  return {"a": a, "b": b, "answer": str(a * b)}


def _max_of(rng):
  xs = _ints(rng)
  return {"xs": " ".join(map(str, xs)), "answer": str(max(xs))}


# --- string edits -----------------------------------------------------------
def _reverse(rng):
  w = _word(rng)
  return {"w": w, "answer": w[::-1]}


def _upper(rng):
  w = _word(rng)
  return {"w": w, "answer": w.upper()}


def _first_letters(rng):
  ws = [_word(rng) for _ in range(rng.randint(3, 5))]
  return {"ws": " ".join(ws), "answer": "".join(w[0] for w in ws)}


def _drop_vowels(rng):
  w = _word(rng, 5, 9)
  return {"w": w, "answer": "".join(c for c in w if c not in "aeiou")}


# --- sorting ----------------------------------------------------------------
def _sort_numbers(rng):
  xs = _ints(rng)
  return {"xs": " ".join(map(str, xs)),
          "answer": " ".join(map(str, sorted(xs)))}


def _sort_words(rng):
  ws = [_word(rng) for _ in range(rng.randint(3, 5))]
  return {"ws": " ".join(ws), "answer": " ".join(sorted(ws))}


def _sort_desc(rng):
  xs = _ints(rng)
  return {"xs": " ".join(map(str, xs)),
          "answer": " ".join(map(str, sorted(xs, reverse=True)))}


# --- counting ---------------------------------------------------------------
def _count_letter(rng):
  w = _word(rng, 6, 12)
  c = rng.choice(w)
  return {"w": w, "c": c, "answer": str(w.count(c))}


def _count_words(rng):
  ws = [_word(rng) for _ in range(rng.randint(2, 9))]
  return {"ws": " ".join(ws), "answer": str(len(ws))}


def _count_even(rng):
  xs = _ints(rng)
  return {"xs": " ".join(map(str, xs)),
          "answer": str(sum(1 for x in xs if x % 2 == 0))}


# --- key-value lookup -------------------------------------------------------
def _kv_pairs(rng):
  keys = rng.sample(string.ascii_lowercase, rng.randint(3, 6))
  return [(k, rng.randint(0, 99)) for k in keys]


def _lookup(rng):
  pairs = _kv_pairs(rng)
  k, v = rng.choice(pairs)
  table = ", ".join(f"{a}={b}" for a, b in pairs)
  return {"table": table, "key": k, "answer": str(v)}


def _reverse_lookup(rng):
  pairs = _kv_pairs(rng)
  values = rng.sample(range(100), len(pairs))
  pairs = [(k, v) for (k, _), v in zip(pairs, values)]
  k, v = rng.choice(pairs)
  table = ", ".join(f"{a}={b}" for a, b in pairs)
  return {"table": table, "value": v, "answer": k}


# --- rule-based classification ---------------------------------------------
def _yes_no(flag: bool) -> str:
  return "yes" if flag else "no"


def _parity(rng):
  x = rng.randint(0, 9999)
  return {"x": x, "answer": "even" if x % 2 == 0 else "odd",
          "options": ("even", "odd")}


def _sign(rng):
  x = rng.randint(-500, 500)
  answer = "positive" if x > 0 else ("negative" if x < 0 else "zero")
  return {"x": x, "answer": answer,
          "options": ("positive", "negative", "zero")}


def _palindrome(rng):
  w = _word(rng, 2, 4)
  if rng.random() < 0.5:
    w = w + w[::-1][rng.randint(0, 1):]
  return {"w": w, "answer": _yes_no(w == w[::-1]), "options": ("yes", "no")}


def _is_sorted(rng):
  xs = _ints(rng)
  if rng.random() < 0.5:
    xs = sorted(xs)
  return {"xs": " ".join(map(str, xs)), "answer": _yes_no(xs == sorted(xs)),
          "options": ("yes", "no")}


# --- word knowledge: fixed word lists a model learns by heart -----------------
_TOPICS = {
    "animal": ("cat", "dog", "horse", "mouse", "tiger", "sheep", "goat",
               "duck"),
    "color": ("red", "blue", "green", "yellow", "purple", "white", "black",
              "brown"),
    "food": ("bread", "rice", "soup", "cheese", "apple", "pasta", "cake",
             "egg"),
    "tool": ("hammer", "saw", "drill", "wrench", "shovel", "axe", "rake",
             "knife"),
}
_POSITIVE = ("great", "lovely", "superb", "fun", "wonderful", "pleasant",
             "good", "excellent")
_NEGATIVE = ("awful", "boring", "bad", "dull", "terrible", "poor", "nasty",
             "horrible")
_REVIEWED = ("film", "meal", "hotel", "book", "game", "show")
_OPPOSITES = (("hot", "cold"), ("big", "small"), ("fast", "slow"),
              ("up", "down"), ("open", "closed"), ("light", "dark"),
              ("early", "late"), ("happy", "sad"), ("full", "empty"),
              ("old", "new"), ("wet", "dry"), ("hard", "soft"))


def _word_topic(rng):
  topic = rng.choice(sorted(_TOPICS))
  return {"w": rng.choice(_TOPICS[topic]), "answer": topic,
          "options": tuple(sorted(_TOPICS))}


def _review_sentiment(rng):
  positive = rng.random() < 0.5
  adjective = rng.choice(_POSITIVE if positive else _NEGATIVE)
  return {"review": f"The {rng.choice(_REVIEWED)} was {adjective}.",
          "answer": "positive" if positive else "negative",
          "options": ("positive", "negative")}


def _antonym(rng):
  pair = rng.choice(_OPPOSITES)
  w = rng.randint(0, 1)
  return {"w": pair[w], "answer": pair[1 - w]}


# --- entailment from templates ---------------------------------------------
_NAMES = ("Ana", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal")
_PLACES = ("park", "shop", "lake", "school", "farm", "museum")


def _location_entailment(rng):
  who = rng.choice(_NAMES)
  where = rng.choice(_PLACES)
  asked = where if rng.random() < 0.5 else rng.choice(_PLACES)
  label = "yes" if asked == where else "no"
  return {"premise": f"{who} is at the {where}.",
          "hypothesis": f"{who} is at the {asked}.",
          "answer": label, "options": ("yes", "no")}


def _comparison_entailment(rng):
  a, b = rng.sample(_NAMES, 2)
  x, y = rng.sample(range(1, 100), 2)
  bigger = rng.choice((a, b))
  truth = (x > y) == (bigger == a)
  return {"premise": f"{a} has {x} apples and {b} has {y} apples.",
          "hypothesis": f"{bigger} has more apples.",
          "answer": _yes_no(truth), "options": ("yes", "no")}


def _t(*prompts: str) -> Tuple[str, ...]:
  return prompts


TASKS: Tuple[GenTask, ...] = (
    GenTask("add", "arithmetic", _add, _t(
        "What is {a} plus {b}?", "Add {a} and {b}.", "{a} + {b} =")),
    GenTask("subtract", "arithmetic", _subtract, _t(
        "What is {a} minus {b}?", "Subtract {b} from {a}.", "{a} - {b} =")),
    GenTask("multiply", "arithmetic", _multiply, _t(
        "What is {a} times {b}?", "Multiply {a} by {b}.", "{a} * {b} =")),
    GenTask("max_of", "arithmetic", _max_of, _t(
        "Which number is largest: {xs}?", "Give the maximum of {xs}.")),
    GenTask("reverse_word", "string_edit", _reverse, _t(
        "Spell '{w}' backwards.", "Reverse the letters of {w}.")),
    GenTask("uppercase", "string_edit", _upper, _t(
        "Write '{w}' in capital letters.", "Uppercase: {w}")),
    GenTask("first_letters", "string_edit", _first_letters, _t(
        "Join the first letter of each word: {ws}",
        "Make an acronym (lower case) from: {ws}")),
    GenTask("drop_vowels", "string_edit", _drop_vowels, _t(
        "Remove the vowels from '{w}'.", "Delete every a, e, i, o, u in {w}.")),
    GenTask("sort_numbers", "sorting", _sort_numbers, _t(
        "Sort in ascending order: {xs}", "Put these numbers from small to "
        "large: {xs}")),
    GenTask("sort_words", "sorting", _sort_words, _t(
        "Sort alphabetically: {ws}", "Order these words as a dictionary "
        "would: {ws}")),
    GenTask("sort_descending", "sorting", _sort_desc, _t(
        "Sort from largest to smallest: {xs}", "Descending order of {xs}:")),
    GenTask("count_letter", "counting", _count_letter, _t(
        "How many times does '{c}' occur in '{w}'?",
        "Count the letter {c} in {w}.")),
    GenTask("count_words", "counting", _count_words, _t(
        "How many words are in: {ws}", "Count the words. {ws}")),
    GenTask("count_even", "counting", _count_even, _t(
        "How many even numbers are in {xs}?",
        "Count the numbers divisible by two: {xs}")),
    GenTask("lookup", "lookup", _lookup, _t(
        "Given {table}, what is {key}?", "Table: {table}. Value of {key}?")),
    GenTask("reverse_lookup", "lookup", _reverse_lookup, _t(
        "Given {table}, which key has value {value}?",
        "Table: {table}. Which name maps to {value}?")),
    GenTask("parity", "classification", _parity, _t(
        "Is {x} even or odd?", "Parity of {x}:"), has_options=True),
    GenTask("sign", "classification", _sign, _t(
        "Is {x} positive, negative or zero?", "Sign of {x}?"), has_options=True),
    GenTask("palindrome", "classification", _palindrome, _t(
        "Is '{w}' a palindrome?", "Does {w} read the same backwards?"), has_options=True),
    GenTask("is_sorted", "classification", _is_sorted, _t(
        "Is the list {xs} in ascending order?", "Sorted? {xs}"), has_options=True),
    GenTask("location_entailment", "entailment", _location_entailment, _t(
        "Premise: {premise} Does it follow that {hypothesis}",
        "{premise} Question: {hypothesis} True?"), has_options=True),
    GenTask("comparison_entailment", "entailment", _comparison_entailment, _t(
        "Premise: {premise} Does it follow that {hypothesis}",
        "{premise} Is it true that {hypothesis}"), has_options=True),
    GenTask("word_topic", "topic", _word_topic, _t(
        "What kind of thing is '{w}'?", "Topic of the word {w}:"),
        has_options=True),
    GenTask("review_sentiment", "sentiment", _review_sentiment, _t(
        "Review: {review} Is it positive or negative?",
        "{review} Sentiment:"), has_options=True),
    GenTask("antonym", "word_relations", _antonym, _t(
        "What is the opposite of '{w}'?", "Opposite of {w}:")),
)

TASKS_BY_NAME: Mapping[str, GenTask] = {t.name: t for t in TASKS}
CLUSTERS: Tuple[str, ...] = tuple(dict.fromkeys(t.cluster for t in TASKS))

FEWSHOT_SEPARATOR = "\n\n"
OPTIONS_HEADER = "\nOPTIONS:"


def render(fields: Fields, template: str, with_options: bool) -> str:
  """Renders one example's prompt, with an options block where asked."""
  text = template.format(**fields)
  if with_options and "options" in fields:
    text += OPTIONS_HEADER + "".join(f"\n- {o}" for o in fields["options"])
  return text


def example_rng(seed: int, task: str, split: str, index: int) -> random.Random:
  return random.Random(f"{seed}/{task}/{split}/{index}")


def generate_examples(task: GenTask, split: str, seed: int, num_examples: int,
                      num_shots: int = 0,
                      with_options: bool = True) -> Iterator[Dict[str, str]]:
  """Yields `{"inputs", "targets"}` text examples of one task and split
  (plus `"options"`, a tuple of str, for tasks with options).

  Each example picks its template from its own rng. With `num_shots > 0` the
  prompt starts with that many solved examples of the same task and split
  (drawn from indices after the split, so they never repeat the query),
  separated by `FEWSHOT_SEPARATOR`.

  Raises:
    ValueError: for an unknown split or a negative count.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")
  if num_examples < 0 or num_shots < 0:
    raise ValueError(f"num_examples={num_examples}, num_shots={num_shots}: "
                     "must be >= 0")
  for i in range(num_examples):
    rng = example_rng(seed, task.name, split, i)
    template = rng.choice(task.templates)
    shots = []
    for j in range(num_shots):
      shot_rng = example_rng(seed, task.name, split + "/shot", i * num_shots + j)
      f = task.generate(shot_rng)
      shots.append(f"{render(f, template, with_options)}\n{f['answer']}")
    fields = task.generate(rng)
    example = {"inputs": FEWSHOT_SEPARATOR.join(
        shots + [render(fields, template, with_options)]),
               "targets": str(fields["answer"])}
    if task.has_options:
      example["options"] = tuple(fields["options"])
    yield example


def pretraining_corpus(seed: int, split: str,
                       num_documents: int) -> Iterator[str]:
  """Yields plain-text documents for span corruption / prefix-LM pre-training.

  Each document concatenates solved examples of random mini_flan tasks,
  so pre-training sees the same surface language the instructions use.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")
  for i in range(num_documents):
    rng = random.Random(f"{seed}/corpus/{split}/{i}")
    parts = []
    for _ in range(rng.randint(2, 5)):
      task = rng.choice(TASKS)
      fields = task.generate(rng)
      parts.append(f"{render(fields, rng.choice(task.templates), False)} "
                   f"{fields['answer']}.")
    yield " ".join(parts)
