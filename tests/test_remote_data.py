"""Data files and `infer` files on a gs:// bucket (the offline fake of
tests/fake_gcs.py, reached in-process through etils.epath and fsspec): a
FLAN-style data directory (a JSONL export mixed by task with its cached line
index, a chain-of-thought file) and an infer input read from it, the
predictions file written to it; each read gives what the same file in a
local folder gives, and nothing is written under the working directory."""

import json

import pytest

from moe_jax import infer
from tasks import capped_source
from tasks import data_dir
from tasks import file_sources
from tasks import flan2022_sources as src
from tasks import line_index
from tests import fake_gcs

EXPORT = src.export_file("flan", "zs_opt")
COT = src.cot_file("gsm8k")
COUNTS = {"anli": 7, "squad": 3, "boolq": 5}
ROWS = [{"inputs": f"{task} question {j}", "targets": f"{task} answer {j}",
         "task_name": task, "template_type": "zs_opt"}
        for task, n in COUNTS.items() for j in range(n)]


@pytest.fixture
def store(tmp_path, monkeypatch):
  """The bucket store (a local folder); the working directory is empty."""
  root = tmp_path / "gcs"
  root.mkdir()
  monkeypatch.setenv(fake_gcs.ROOT_ENV, str(root))
  monkeypatch.setenv("EPATH_USE_TF", "false")
  fake_gcs.register_filesystem()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield root
  assert not list(cwd.iterdir())  # no local '<cwd>/gs:/bucket/...'


def _write_data(folder):
  """A FLAN-style data directory under `folder` (a local pathlib.Path)."""
  export = folder / EXPORT
  export.parent.mkdir(parents=True)
  export.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
  cot = folder / COT
  cot.parent.mkdir(parents=True)
  cot.write_text("".join(f"q{j}\ta{j}\tbecause {j}\n" for j in range(4)))


def _read_data():
  """(export stream of two epochs, task counts, CoT examples) of the data
  directory that MOE_JAX_DATA_DIR names."""
  export = capped_source.CappedJsonlSource(
      EXPORT, src.EXPORT_FIELDS, "task_name", cap=lambda: 4,
      description="FLAN export")
  dataset = export.get_dataset("train", shuffle=True, seed=3).repeat(2)
  stream = [ex["inputs"].decode() for ex in dataset.as_numpy_iterator()]
  cot = file_sources.FileDataSource({"train": COT}, src.COT_FIELDS, "CoT")
  return stream, export.task_counts(), (cot.num_input_examples("train"),
                                        cot.examples("train"))


def test_flan_data_dir_on_gs_reads_as_a_local_one(store, tmp_path,
                                                  monkeypatch):
  _write_data(tmp_path / "local")
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path / "local"))
  local = _read_data()

  _write_data(store / "bucket" / "data")
  monkeypatch.setenv(data_dir.ENV_VAR, "gs://bucket/data")
  remote = _read_data()
  assert remote == local
  stream, counts, (num_cot, cot) = remote
  assert counts == COUNTS
  assert len(stream) == 2 * (4 + 3 + 4) and stream[:11] != stream[11:]
  assert num_cot == 4 and cot[1] == {"question": "q1", "answer": "a1",
                                     "rationale": "because 1"}
  # The line index is cached in the bucket, next to the export.
  cached = store / "bucket" / "data" / (EXPORT + line_index.INDEX_SUFFIX)
  assert cached.is_file()
  index = line_index.load_or_build(f"gs://bucket/data/{EXPORT}", "task_name")
  assert index.counts() == counts

  with pytest.raises(FileNotFoundError, match="gs://bucket/data/flan_cot/"
                     "aqua_train.tsv"):
    data_dir.require_file(src.cot_file("aqua"), "CoT aqua")


def test_infer_reads_inputs_from_and_writes_predictions_to_gs(store):
  bucket = store / "bucket"
  bucket.mkdir()
  records = [{"inputs": "translate: cat", "id": 1},
             {"inputs": "translate: dog", "id": 2}]
  (bucket / "in.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in records) + "\n")
  (bucket / "in.txt").write_text("first line\nsecond line\n")
  assert infer.read_inputs("gs://bucket/in.jsonl") == records
  assert infer.read_inputs("gs://bucket/in.txt") == [
      {"inputs": "first line"}, {"inputs": "second line"}]

  predictions = [{**r, "prediction": f"guess {r['id']}"} for r in records]
  infer.write_jsonl(predictions, "gs://bucket/out/predictions.jsonl")
  written = (bucket / "out" / "predictions.jsonl").read_text()
  assert [json.loads(line) for line in written.splitlines()] == predictions

  (bucket / "bad.txt").write_bytes(b"fine\n\xff broken\n")
  with pytest.raises(ValueError, match=r"gs://bucket/bad.txt:2: not valid "
                     "UTF-8"):
    infer.read_inputs("gs://bucket/bad.txt")
  with pytest.raises(ValueError, match="not found: gs://bucket/none.jsonl"):
    infer.read_inputs("gs://bucket/none.jsonl")
