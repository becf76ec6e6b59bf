"""MMLU / BBH readers on fixture files in the public formats; metrics."""

import csv
import json

import pytest
import seqio

import tasks  # noqa: F401  # registers everything
from tasks import bbh
from moe_jax.train import eval_averages
from tasks import data_dir
from tasks import heldout
from tasks import metrics
from tasks import mmlu
from tasks import reasoning

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


def _seqio_eval(name, split, score=None, predict=None):
  """seqio's evaluator on task `name` with score(row) / predict(row)."""
  evaluator = seqio.Evaluator(
      name, seqio.EncDecFeatureConverter(pack=False), eval_split=split,
      sequence_length=LENGTHS, use_memory_cache=False,
      async_compute_metrics=False)
  rows = list(seqio.get_mixture_or_task(name).get_dataset(
      LENGTHS, split=split, shuffle=False, try_in_mem_cache=False)
              .as_numpy_iterator())

  def fn(of):
    def run(dataset, model_feature_shapes=None):
      del model_feature_shapes
      return [(int(i), of(rows[int(i)])) for i, _ in dataset]
    return run if of else None

  vocab = seqio.get_mixture_or_task(name).output_features[
      "targets"].vocabulary
  def encoded(row):  # token ids padded to one length, as a model returns
    ids = vocab.encode(predict(row)) + [vocab.eos_id]
    return ids + [0] * (64 - len(ids))
  future, _ = evaluator.evaluate(compute_metrics=True, step=0,
                                 score_fn=fn(score),
                                 predict_fn=fn(predict and encoded))
  return future.result(), {name: rows}


def test_mmlu_rank_task_scores_the_four_letters(mmlu_dir):
  name = "mmlu_anatomy_5shot_rank"
  result, rows = _seqio_eval(name, "validation",
                             score=lambda r: float(r["is_correct"]))
  assert result[name]["rank_accuracy"] == 100.0
  rows = rows[name]
  assert [r["targets_pretokenized"] for r in rows] == [
      l.encode() for l in mmlu.LETTERS] * 2
  assert rows[0]["inputs_pretokenized"].decode().endswith("Answer:")
  # Always choosing "A" is right for the second question only.
  always_a, _ = _seqio_eval(
      name, "validation", score=lambda r: float(r["targets_pretokenized"]
                                                == b"A"))
  assert always_a[name]["rank_accuracy"] == pytest.approx(50.0)
  assert len(seqio.get_mixture_or_task("mmlu_0shot_rank").tasks) == 57


def test_mmlu_generation_metric_through_seqio(mmlu_dir):
  name = "mmlu_anatomy_0shot"
  result, _ = _seqio_eval(name, "validation", predict=lambda r: "C) rib")
  assert result[name]["letter_accuracy"] == pytest.approx(50.0)


def test_bbh_rank_options(bbh_dir):
  name = "bbh_boolean_expressions_direct_rank"
  result, rows = _seqio_eval(name, "test",
                             score=lambda r: float(r["targets_pretokenized"]
                                                   == b"True"))
  assert [r["targets_pretokenized"] for r in rows[name]] == [
      b"True", b"False"] * 2
  assert result[name]["rank_accuracy"] == pytest.approx(50.0)
  question = "Which?\nOptions:\n(A) red\n(B) blue\n(C) green"
  assert bbh.options("hyperbaton", question) == ["(A)", "(B)", "(C)"]
  ranked = {t.name for t in seqio.get_mixture_or_task(
      "bbh_direct_rank").tasks}
  assert len(ranked) == 27 - len(bbh.FREE_FORM_TASKS)
  assert "bbh_word_sorting_direct_rank" not in ranked


def test_rank_row_without_its_target_named(bbh_dir):
  (bbh_dir / "bbh" / "bbh" / "boolean_expressions.json").write_text(
      json.dumps({"examples": [{"input": "x", "target": "maybe"}]}))
  task = seqio.get_mixture_or_task("bbh_boolean_expressions_direct_rank")
  with pytest.raises(ValueError, match="bbh_boolean_expressions_direct_rank "
                     r"\(test\): example 0 needs 'options'"):
    list(task.get_dataset(None, split="test", shuffle=False,
                          try_in_mem_cache=False).as_numpy_iterator())


@pytest.fixture
def reasoning_dir(tmp_path, monkeypatch):
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path))
  (tmp_path / "reasoning").mkdir()
  rows = [{"question": "Tom has 3 apples and buys 4. How many?",
           "answer": "3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
          {"question": "What is 1,000 + 234?", "answer": "1,234"},
          {"question": "Half of 5?", "answer": "2.5"}]
  (tmp_path / "reasoning" / "gsm8k_test.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows))
  return tmp_path


def test_reasoning_task_and_final_number_metric(reasoning_dir):
  name = "reasoning_gsm8k_cot"
  answers = {b"7": "He has 3 + 4 = 7. So the answer is 7.",
             b"1234": "The sum is 1,234.",
             b"2.5": "So the answer is 3."}
  result, rows = _seqio_eval(
      name, "test", predict=lambda r: answers[r["targets_pretokenized"]])
  assert [r["targets_pretokenized"] for r in rows[name]] == [
      b"7", b"1234", b"2.5"]
  assert rows[name][0]["inputs_pretokenized"].decode().endswith(
      "How many?\nA: Let's think step by step.")
  assert result[name]["number_accuracy"] == pytest.approx(200 / 3)
  assert metrics.final_number("so the answer is -12.") == -12.0
  assert metrics.final_number("no idea") is None
  bad = reasoning_dir / "reasoning" / "svamp_test.jsonl"
  bad.write_text('{"question": "q", "answer": "7"}\n{"question": "q", '
                 '"answer": "seven"}\n')
  with pytest.raises(ValueError, match="svamp_test.jsonl: example 2: the answer 'seven'"):
    reasoning.examples("svamp", cot=False)


def test_heldout_average_is_per_benchmark():
  """FLAN-MoE's held-out mixture averages MMLU, BBH, reasoning and QA once
  each, not their 91 tasks."""
  per_task = {}
  for suite, value in zip(heldout.SUITES, (40.0, 30.0, 10.0, 60.0)):
    for task in seqio.get_mixture_or_task(suite).tasks:
      per_task[task.name] = {"m": value}
  assert len(per_task) == 57 + 27 + 4 + 3
  out = eval_averages.averages(heldout.NAME, per_task)
  assert out["mmlu_5shot/average"]["score"] == pytest.approx(40.0)
  assert out[f"{heldout.NAME}/average"]["score"] == pytest.approx(140 / 4)
  assert eval_averages.averages("mmlu_anatomy_5shot", per_task) == {}
