"""QA (ARC, BoolQ) and StrategyQA evals on small files in the documented
formats: prompts, targets, rank options, metrics through SeqIO, errors."""

import json

import pytest
import seqio

import tasks  # noqa: F401  # registers everything
from tasks import data_dir
from tasks import metrics
from tasks import qa
from tasks import reasoning
from tests.test_tasks_evals import _seqio_eval

ARC_RELEASE = {"id": "x1", "answerKey": "B", "question": {
    "stem": "Which is a metal?", "choices": [
        {"text": "wood", "label": "A"}, {"text": "iron", "label": "B"},
        {"text": "glass", "label": "C"}]}}
COMMON = {"question": "Which gas do plants take in?",
          "choices": ["oxygen", "carbon dioxide"], "answer": "carbon dioxide"}
BOOLQ_RELEASE = {"question": "is the sky blue", "title": "Sky",
                 "answer": True, "passage": "The sky is blue by day."}


def _write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def qa_dir(tmp_path, monkeypatch):
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path))
  _write_jsonl(tmp_path / "qa" / "arc_easy_test.jsonl", [ARC_RELEASE, COMMON])
  _write_jsonl(tmp_path / "qa" / "boolq_test.jsonl", [
      BOOLQ_RELEASE, dict(BOOLQ_RELEASE, question="is fire cold",
                          answer=False)])
  return tmp_path


def test_qa_prompts_from_common_and_release_forms(qa_dir):
  arc = qa.examples("arc_easy")
  assert [r["targets"] for r in arc] == ["iron", "carbon dioxide"]
  assert arc[0]["inputs"] == ("Which is a metal?\n\nOPTIONS:\n- wood\n"
                              "- iron\n- glass")
  assert arc[0]["options"] == ["wood", "iron", "glass"]
  boolq = qa.examples("boolq")
  assert [r["targets"] for r in boolq] == ["yes", "no"]
  assert boolq[0]["inputs"].startswith("The sky is blue by day.\n\n"
                                       "is the sky blue\n\nOPTIONS:\n- no")


def test_qa_metrics_through_seqio(qa_dir):
  name = "qa_arc_easy_direct_rank"
  # The longest option scores highest: right for the second question only.
  result, rows = _seqio_eval(name, "test", score=lambda r: float(
      len(r["targets_pretokenized"])))
  assert [r["targets_pretokenized"] for r in rows[name]] == [
      b"wood", b"iron", b"glass", b"oxygen", b"carbon dioxide"]
  assert result[name]["rank_accuracy"] == pytest.approx(50.0)
  name = "qa_boolq_direct"
  result, _ = _seqio_eval(name, "test", predict=lambda r: " yes ")
  assert result[name]["exact_match"] == pytest.approx(50.0)
  assert {t.name for t in seqio.get_mixture_or_task("qa_direct").tasks} == {
      f"qa_{i}_direct" for i in qa.ITEMS}


def test_qa_bad_lines_named(qa_dir):
  path = qa_dir / "qa" / "arc_challenge_test.jsonl"
  _write_jsonl(path, [COMMON, dict(COMMON, answer="nitrogen")])
  with pytest.raises(ValueError, match=f"{path}:2: the answer 'nitrogen' "
                     "is not one of the choices"):
    qa.examples("arc_challenge")
  _write_jsonl(path, [{"question": "q", "answer": "a"}])
  with pytest.raises(ValueError, match=rf"{path}:1: expected \{{question, "
                     "choices, answer"):
    qa.examples("arc_challenge")


@pytest.fixture
def strategyqa_dir(tmp_path, monkeypatch):
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path))
  _write_jsonl(tmp_path / "reasoning" / "strategyqa_test.jsonl", [
      {"question": "Can a fish climb a tree?", "answer": False},
      {"question": "Is ice cold?", "answer": True},
      {"question": "Is Paris in France?", "answer": "Yes"}])
  return tmp_path


def test_strategyqa_yes_no_metric_and_rank_task(strategyqa_dir):
  name = "reasoning_strategyqa_cot"
  answers = {"Can": "Fish have no limbs. So the answer is no.",
             "Is ice": "Ice is frozen water, so yes.",
             "Is Paris": "Paris is the capital. The answer is: No."}
  result, rows = _seqio_eval(name, "test",
                             predict=lambda r: _answer(r, answers))
  assert [r["targets_pretokenized"] for r in rows[name]] == [
      b"no", b"yes", b"yes"]
  assert rows[name][0]["inputs_pretokenized"].decode() == (
      "Q: Can a fish climb a tree?\nA: Let's think step by step.")
  assert result[name]["yes_no_accuracy"] == pytest.approx(200 / 3)
  name = "reasoning_strategyqa_direct_rank"
  result, rows = _seqio_eval(name, "test", score=lambda r: float(
      r["targets_pretokenized"] == b"yes"))
  assert [r["targets_pretokenized"] for r in rows[name]] == [
      b"yes", b"no"] * 3
  assert result[name]["rank_accuracy"] == pytest.approx(200 / 3)
  assert metrics.yes_no("I think not. The answer is no.") == "no"
  assert metrics.yes_no("maybe") is None
  mixture = seqio.get_mixture_or_task("reasoning_cot")
  assert f"reasoning_{reasoning.YES_NO_ITEMS[0]}_cot" in {
      t.name for t in mixture.tasks}


def _answer(row, answers):
  """The answer whose key starts the row's question."""
  question = row["inputs_pretokenized"].decode()
  return next(a for k, a in answers.items() if question.startswith("Q: " + k))


def test_strategyqa_bad_answer_named(strategyqa_dir):
  path = strategyqa_dir / "reasoning" / "strategyqa_test.jsonl"
  _write_jsonl(path, [{"question": "q", "answer": "perhaps"}])
  with pytest.raises(ValueError, match=f"{path}: example 1: the answer "
                     "'perhaps' is not yes/no"):
    reasoning.examples("strategyqa", cot=False)
