"""Data files and `infer` files on a gs:// bucket (the offline fake of
tests/fake_gcs.py, reached in-process through etils.epath and fsspec, and
for TFRecord files through TensorFlow's own GCS client): a FLAN-style data
directory (a JSONL export mixed by task with its cached line index, a
chain-of-thought file), a TFRecord file source, and an infer input read
from it, the predictions file written to it; each read gives what the same
file in a local folder gives, and nothing is written under the working
directory."""

import json

import pytest
import tensorflow as tf

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
  export = capped_source.CappedFileSource(
      EXPORT, src.EXPORT_FIELDS, "FLAN export", task_field="task_name",
      cap=lambda: 4)
  dataset = export.get_dataset("train", shuffle=True, seed=3).repeat(2)
  stream = [ex["inputs"].decode() for ex in dataset.as_numpy_iterator()]
  cot = capped_source.CappedFileSource(COT, src.COT_FIELDS, "CoT")
  examples = [{k: v.decode() for k, v in ex.items()} for ex in
              cot.get_dataset("train", shuffle=False).as_numpy_iterator()]
  return stream, export.task_counts(), (cot.num_input_examples("train"),
                                        examples)


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
  index = line_index.load_or_build(f"gs://bucket/data/{EXPORT}",
                                   src.EXPORT_FIELDS, "task_name")
  assert index.counts() == counts

  with pytest.raises(FileNotFoundError, match="gs://bucket/data/flan_cot/"
                     "aqua_train.tsv"):
    data_dir.require_file(src.cot_file("aqua"), "CoT aqua")


@pytest.fixture
def tensorflow_gcs(store, tmp_path, monkeypatch):
  """TensorFlow's GCS client sent to the fake server over `store`."""
  server = fake_gcs.FakeGcsServer(store).start()
  for key, value in server.tensorflow_env(tmp_path).items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv("GCS_RETRY_CONFIG_MAX_RETRIES", "1")  # fail fast
  yield
  server.shutdown()


def _write_tfrecord(path, rows):
  path.parent.mkdir(parents=True)
  with tf.io.TFRecordWriter(str(path)) as writer:
    for row in rows:
      writer.write(tf.train.Example(features=tf.train.Features(feature={
          k: tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[v.encode()])) for k, v in row.items()})
                                   ).SerializeToString())


@pytest.mark.usefixtures("tensorflow_gcs")
def test_a_tfrecord_source_on_gs_reads_as_a_local_one(store, tmp_path,
                                                      monkeypatch):
  rows = [{"inputs": f"question {j} \u00e9", "targets": f"answer {j}"}
          for j in range(6)]
  relative = "qa/train.tfrecord"

  def read():
    source = file_sources.FileDataSource({"train": relative},
                                         ("inputs", "targets"), "QA")
    dataset = source.get_dataset("train", shuffle=False)
    return (source.num_input_examples("train"), source.examples("train"),
            [{k: v.decode() for k, v in ex.items()}
             for ex in dataset.as_numpy_iterator()])

  _write_tfrecord(tmp_path / "local" / relative, rows)
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path / "local"))
  local = read()
  _write_tfrecord(store / "bucket" / "data" / relative, rows)
  monkeypatch.setenv(data_dir.ENV_VAR, "gs://bucket/data")
  # tf.data reads the records through TensorFlow's GCS client, which only
  # the fake server can answer.
  assert tf.io.gfile.exists(f"gs://bucket/data/{relative}")
  assert read() == local == (6, rows, rows)
  (store / "bucket" / "data" / "qa" / "empty.tfrecord").write_bytes(b"")
  with pytest.raises(ValueError, match="gs://bucket/data/qa/empty.tfrecord: "
                     "no examples"):
    file_sources.FileDataSource({"train": "qa/empty.tfrecord"}, ("inputs",),
                                "QA").examples("train")


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
