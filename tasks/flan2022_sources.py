"""Datasets of the FLAN 2022 mixture: TFDS, FLAN CoT TSVs, JSONL exports
(both file kinds streamed by `capped_source`).

A representative, correct set of TFDS datasets (names and versions as TFDS
publishes them) with templates written for this project, the seven FLAN
chain-of-thought TSV files, and the public JSONL exports of the collection
(fields inputs, targets, task_name, template_type) for everything else.
Nothing here touches a file or the network until a dataset is requested.
"""

import dataclasses
from typing import Callable, Dict, Mapping, Tuple

import seqio
import tensorflow as tf

from tasks import capped_source

SUBMIXES = ("flan2021", "t0", "niv2", "cot", "dialog")
# Template variants; cot, niv2 and dialog have options-only variants.
ALL_VARIANTS = ("zs_opt", "zs_noopt", "fs_opt", "fs_noopt")
OPTIONS_ONLY_VARIANTS = ("zs_opt", "fs_opt")
SUBMIX_VARIANTS = {"flan2021": ALL_VARIANTS, "t0": ALL_VARIANTS,
                   "niv2": OPTIONS_ONLY_VARIANTS, "cot": OPTIONS_ONLY_VARIANTS,
                   "dialog": OPTIONS_ONLY_VARIANTS}
# Sub-mixtures that also read JSONL exports (cot reads only the CoT TSVs).
EXPORT_SUBMIXES = ("flan2021", "t0", "niv2", "dialog")
EXPORT_FIELDS = ("inputs", "targets", "task_name", "template_type")
COT_FIELDS = ("question", "answer", "rationale")
COT_DATASETS = ("aqua", "creak", "ecqa", "gsm8k", "qasc", "sensemaking",
                "strategyqa")

Fields = Dict[str, tf.Tensor]


@dataclasses.dataclass(frozen=True)
class FlanDataset:
  """One dataset of the collection and how to prompt it.

  to_fields maps a raw example to string fields used by `prompts`, plus
  "answer" (<string>[]) and, for option tasks, "options" (<string>[n]).
  """
  name: str
  submix: str
  source: Callable[[], seqio.DataSource]
  to_fields: Callable[[Mapping[str, tf.Tensor]], Fields]
  prompts: Tuple[str, ...]
  has_options: bool

  def variants(self) -> Tuple[str, ...]:
    allowed = SUBMIX_VARIANTS[self.submix]
    if not self.has_options:
      allowed = tuple(v for v in allowed if v.endswith("noopt"))
    return allowed


def _tfds(name: str, splits: Tuple[str, ...] = ("train", "validation")
          ) -> Callable[[], seqio.DataSource]:
  """A TFDS source; `splits` are the ones TFDS publishes for `name` that we
  use (named here so that no dataset metadata is read to list them)."""
  return lambda: seqio.TfdsDataSource(tfds_name=name, splits=splits)


def _classes(*names: str, **text_keys: str):
  """to_fields for a ClassLabel `label`: text fields renamed per text_keys."""
  def fn(ex):
    options = tf.constant(names)
    out = {k: ex[v] for k, v in text_keys.items()}
    out["options"] = options
    out["answer"] = tf.gather(options, ex["label"])
    return out
  return fn


def _bool_q(ex):
  options = tf.constant(["no", "yes"])
  return {"passage": ex["passage"], "question": ex["question"],
          "options": options,
          "answer": tf.gather(options, tf.cast(ex["answer"], tf.int32))}


def _choice(question_keys: Mapping[str, str], option_keys: Tuple[str, ...]):
  """to_fields for multiple choice: options from fields, `label` the index."""
  def fn(ex):
    options = tf.stack([ex[k] for k in option_keys])
    out = {k: ex[v] for k, v in question_keys.items()}
    out["options"] = options
    out["answer"] = tf.gather(options, ex["label"])
    return out
  return fn


def _squad(ex):
  return {"context": ex["context"], "question": ex["question"],
          "answer": ex["answers"]["text"][0]}


def _summary(text_key: str, summary_key: str):
  return lambda ex: {"text": ex[text_key], "answer": ex[summary_key]}


def _unescape(text: tf.Tensor) -> tf.Tensor:
  return tf.strings.regex_replace(text, r"\\n", "\n")


def _cot_fields(ex):
  # The files escape newlines as a literal backslash-n. The target states the
  # reasoning, then the answer.
  return {"question": _unescape(ex["question"]),
          "answer": tf.strings.join([_unescape(ex["rationale"]),
                                     " So the answer is ", ex["answer"], "."])}


_NLI = ("Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise "
        "entail the hypothesis?",
        "{premise}\n\nGiven the passage above, is it true that "
        "\"{hypothesis}\"?",
        "Read this: {premise}\nCan we conclude: {hypothesis}?")
_SENTIMENT = ("Review: {text}\nIs this review positive or negative?",
              "{text}\n\nWhat is the sentiment of the text above?",
              "How does the writer feel? \"{text}\"")
_SUMMARY = ("Summarize this:\n\n{text}",
            "{text}\n\nWrite a short summary of the text above.",
            "Give the gist of the following in a sentence or two.\n{text}")
_COT = ("{question}\nThink it through step by step, then answer.",
        "Question: {question}\nLet's reason about it before answering.",
        "{question}\nExplain your reasoning first.")

TFDS_DATASETS = (
    FlanDataset("rte", "flan2021", _tfds("glue/rte:2.0.0"),
                _classes("yes", "no", premise="sentence1",
                         hypothesis="sentence2"), _NLI, True),
    FlanDataset("anli_r1", "flan2021", _tfds("anli/r1:0.1.0"),
                _classes("yes", "it is not possible to tell", "no",
                         premise="context", hypothesis="hypothesis"),
                _NLI, True),
    FlanDataset("sst2", "flan2021", _tfds("glue/sst2:2.0.0"),
                _classes("negative", "positive", text="sentence"),
                _SENTIMENT, True),
    FlanDataset("bool_q", "flan2021", _tfds("bool_q:1.0.0"), _bool_q,
                ("{passage}\n\nQuestion: {question}?",
                 "Based on this text, answer yes or no: {question}?\n"
                 "{passage}"), True),
    FlanDataset("ag_news", "flan2021", _tfds("ag_news_subset:1.0.0",
                                               ("train", "test")),
                _classes("World", "Sports", "Business", "Science/Tech",
                         title="title", text="description"),
                ("{title}\n{text}\nWhich topic is this article about?",
                 "What section of a newspaper would run \"{title}: {text}\"?"),
                True),
    FlanDataset("piqa", "flan2021", _tfds("piqa:1.0.0"),
                _choice({"goal": "goal"}, ("sol1", "sol2")),
                ("Goal: {goal}\nWhich way is better to reach it?",
                 "How would you do this: {goal}"), True),
    FlanDataset("squad_v1", "flan2021", _tfds("squad/v1.1:3.0.0"), _squad,
                ("{context}\n\nAnswer from the passage: {question}",
                 "Read the text and answer.\n{context}\nQ: {question}"),
                False),
    FlanDataset("xsum", "flan2021", _tfds("xsum:1.1.0"),
                _summary("document", "summary"), _SUMMARY, False),
    FlanDataset("qqp", "t0", _tfds("glue/qqp:2.0.0"),
                _classes("no", "yes", q1="question1", q2="question2"),
                ("Are these two questions asking the same thing?\n1. {q1}\n"
                 "2. {q2}",
                 "\"{q1}\" and \"{q2}\": duplicates or not?"), True),
    FlanDataset("imdb", "t0", _tfds("imdb_reviews/plain_text:1.0.0",
                                      ("train", "test")),
                _classes("negative", "positive", text="text"), _SENTIMENT,
                True),
    FlanDataset("yelp", "t0", _tfds("yelp_polarity_reviews:0.2.0",
                                      ("train", "test")),
                _classes("negative", "positive", text="text"), _SENTIMENT,
                True),
    FlanDataset("cosmos_qa", "t0", _tfds("cosmos_qa:1.0.0"),
                _choice({"context": "context", "question": "question"},
                        ("answer0", "answer1", "answer2", "answer3")),
                ("{context}\nQuestion: {question}",
                 "Read the story and pick the best answer.\n{context}\n"
                 "{question}"), True),
    FlanDataset("samsum", "t0", _tfds("samsum:1.0.0"),
                _summary("dialogue", "summary"), _SUMMARY, False),
    FlanDataset("cnn_dailymail", "t0", _tfds("cnn_dailymail:3.4.0"),
                _summary("article", "highlights"), _SUMMARY, False),
)


def cot_file(name: str) -> str:
  """Path of a FLAN CoT TSV (question, answer, rationale) in the data dir."""
  return f"flan_cot/{name}_train.tsv"


def _cot_source(name: str) -> Callable[[], seqio.DataSource]:
  """The file of one task, streamed through its line index (its cap is
  in the mixture's rate)."""
  return lambda: capped_source.CappedFileSource(
      cot_file(name), COT_FIELDS, f"FLAN chain-of-thought data {name!r} "
      "(TSV: question, answer, rationale)")


COT_DATASETS_SPECS = tuple(
    FlanDataset(name, "cot", _cot_source(name), _cot_fields, _COT, True)
    for name in COT_DATASETS)

DATASETS = TFDS_DATASETS + COT_DATASETS_SPECS


def export_file(submix: str, variant: str) -> str:
  """Path of a JSONL export (inputs, targets, task_name, template_type)."""
  return f"flan2022/{submix}_{variant}_train.jsonl"

