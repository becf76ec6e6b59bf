"""MMLU / BBH readers on fixture files in the public formats; metrics."""

import csv
import json

import pytest
import seqio

import tasks  # noqa: F401  # registers everything
from tasks import bbh
from tasks import data_dir
from tasks import metrics
from tasks import mmlu

LENGTHS = {"inputs": 512, "targets": 8}


def _write_mmlu(root, subject, split_dir, rows):
  d = root / "mmlu" / "data" / split_dir
  d.mkdir(parents=True, exist_ok=True)
  with open(d / f"{subject}_{split_dir}.csv", "w", newline="") as f:
    csv.writer(f).writerows(rows)


@pytest.fixture
def mmlu_dir(tmp_path, monkeypatch):
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path))
  dev = [[f"dev q{i}, with comma", "w", "x", "y", "z", "ABCD"[i % 4]]
         for i in range(6)]
  _write_mmlu(tmp_path, "anatomy", "dev", dev)
  _write_mmlu(tmp_path, "anatomy", "val", [
      ["Which bone?\nPick one.", "femur", "ulna", "rib", "skull", "C"],
      ["Second?", "a", "b", "c", "d", "A"]])
  return tmp_path


def test_mmlu_prompts(mmlu_dir):
  rows = mmlu.examples("anatomy", "validation", 5)
  assert [r["targets"] for r in rows] == ["C", "A"]
  text = rows[0]["inputs"]
  assert text.startswith("The following are multiple choice questions (with "
                         "answers) about anatomy.\n\ndev q0, with comma\nA. w")
  assert text.count("Answer: ") == 5 and "dev q5" not in text
  assert text.endswith("Which bone?\nPick one.\nA. femur\nB. ulna\nC. rib\n"
                       "D. skull\nAnswer:")
  zero = mmlu.examples("anatomy", "validation", 0)[0]["inputs"]
  assert "dev q0" not in zero and zero.endswith("D. skull\nAnswer:")


def test_mmlu_task_packs(mmlu_dir):
  task = seqio.get_mixture_or_task("mmlu_anatomy_5shot")
  ds = task.get_dataset(LENGTHS, split="validation", shuffle=False,
                        try_in_mem_cache=False)
  ex = next(iter(ds.as_numpy_iterator()))
  assert ex["targets_pretokenized"] == b"C"
  assert len(seqio.get_mixture_or_task("mmlu_0shot").tasks) == 57


def test_mmlu_bad_row_named(tmp_path):
  path = tmp_path / "x_val.csv"
  path.write_text('q,a,b,c,d,A\nq,a,b,c,d,E\n')
  with pytest.raises(ValueError, match="x_val.csv:2: expected"):
    mmlu.read_csv(str(path))


def test_mmlu_missing_subject_file(tmp_path, monkeypatch):
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="virology_test.csv"):
    mmlu.examples("virology", "test", 0)


def test_mmlu_metrics():
  assert metrics.letter_exact_match(
      ["C", "A", "B", "D"], [" C", "(A) because", "D", "Dog"]
  )["letter_accuracy"] == pytest.approx(50.0)
  q = {"question": "q", "options": ["a", "b", "c", "d"], "answer": "B"}
  pairs = mmlu.rank_examples("anatomy", q, [])
  assert [p["targets"] for p in pairs] == list(mmlu.LETTERS)
  scores = [[-3.0, -1.0, -2.0, -5.0], [-0.5, -0.1, -2.0, -0.2]]
  assert metrics.rank_classification(scores, [1, 3])[
      "rank_accuracy"] == pytest.approx(50.0)


_COT_PROMPT = """Evaluate the expression.

-----

Q: not ( True ) and ( True ) is
A: Let's think step by step.
not ( True ) = False. False and True = False. So the answer is False.

Q: True and not not ( not False ) is
A: Let's think step by step.
not False = True. So the answer is True.

Q: not True or ( False and True ) is
A: Let's think step by step.
Both parts are False. So the answer is False."""


@pytest.fixture
def bbh_dir(tmp_path, monkeypatch):
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path))
  (tmp_path / "bbh" / "bbh").mkdir(parents=True)
  (tmp_path / "bbh" / "cot-prompts").mkdir(parents=True)
  (tmp_path / "bbh" / "cot-prompts" / "boolean_expressions.txt").write_text(
      _COT_PROMPT)
  (tmp_path / "bbh" / "bbh" / "boolean_expressions.json").write_text(
      json.dumps({"examples": [{"input": "True and False is",
                                "target": "False"},
                               {"input": "not False is", "target": "True"}]}))
  return tmp_path


def test_bbh_prompts(bbh_dir):
  direct = bbh.examples("boolean_expressions", "direct")
  cot = bbh.examples("boolean_expressions", "cot")
  assert [r["targets"] for r in direct] == ["False", "True"]
  d = direct[0]["inputs"]
  assert "Let's think" not in d and "Evaluate the expression" not in d
  assert d.startswith("Q: not ( True ) and ( True ) is\nA: False\n\n"
                      "Q: True and not not ( not False ) is\nA: True\n\n")
  assert d.endswith("\n\nQ: True and False is\nA:")
  c = cot[0]["inputs"]
  assert c.count("So the answer is") == 3
  assert c.endswith("Q: True and False is\nA: Let's think step by step.")


def test_bbh_task_packs(bbh_dir):
  task = seqio.get_mixture_or_task("bbh_boolean_expressions_cot")
  ex = next(iter(task.get_dataset(LENGTHS, split="test", shuffle=False,
                                  try_in_mem_cache=False).as_numpy_iterator()))
  assert ex["targets_pretokenized"] == b"False"
  assert len(seqio.get_mixture_or_task("bbh_direct").tasks) == 27


def test_bbh_bad_json_named(tmp_path):
  path = tmp_path / "t.json"
  path.write_text('{"examples": [\n{"input": 1}\n')
  with pytest.raises(ValueError, match="t.json:3: not valid JSON"):
    bbh.read_examples(str(path))
  path.write_text('{"examples": [{"input": "x"}]}')
  with pytest.raises(ValueError, match="example 0 lacks"):
    bbh.read_examples(str(path))


def test_answer_extraction_and_bbh_metric():
  assert metrics.extract_answer("x. So the answer is (B).") == "(B)"
  assert metrics.extract_answer("The answer is: 42") == "42"
  assert metrics.extract_answer("  True ") == "True"
  preds = ["Let's see. So the answer is False.", "True", "so the answer is 7."]
  assert metrics.extracted_exact_match(["False", "True", "8"], preds)[
      "exact_match"] == pytest.approx(200 / 3)
