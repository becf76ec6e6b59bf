"""FLAN 2022 mixture: sources resolve, batches pack, capped rates, bad input."""

import json
import os
import subprocess
import sys

import gin
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

import tasks
from tasks import data_dir
from tasks import file_sources
from tasks import flan2022
from tasks import flan2022_sources as src

LENGTHS = {"inputs": 128, "targets": 32}


def _packed_batch(task, split="train"):
  ds = task.get_dataset(LENGTHS, split=split, shuffle=False,
                        try_in_mem_cache=False)
  ds = seqio.EncDecFeatureConverter(pack=True)(ds, LENGTHS)
  return next(iter(ds.batch(2).as_numpy_iterator()))


@pytest.fixture
def local_data(tmp_path, monkeypatch):
  """A data directory with CoT TSVs and JSONL exports written here."""
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path))
  (tmp_path / "flan_cot").mkdir()
  for i, name in enumerate(src.COT_DATASETS):
    rows = [f"Q{name}{j}?\\nOptions: x y\t{j}\tStep {j}." for j in
            range(8 + i)]
    (tmp_path / "flan_cot" / f"{name}_train.tsv").write_text(
        "\n".join(rows) + "\n")
  (tmp_path / "flan2022").mkdir()
  for submix in src.EXPORT_SUBMIXES:
    for k, variant in enumerate(src.SUBMIX_VARIANTS[submix]):
      rows = [{"inputs": f"{submix} question {j}", "targets": f"answer {j}",
               "task_name": f"{submix}_t", "template_type": variant}
              for j in range(5 + k)]
      (tmp_path / src.export_file(submix, variant)).write_text(
          "".join(json.dumps(r) + "\n" for r in rows))
  return tmp_path


def test_every_registered_name_resolves():
  for name in seqio.TaskRegistry.names():
    assert seqio.get_mixture_or_task(name).source is not None, name
  for name in seqio.MixtureRegistry.names():
    assert seqio.get_mixture_or_task(name).tasks, name
  flan = {t.name for t in seqio.get_mixture_or_task("flan2022").tasks}
  for submix in src.SUBMIXES:
    sub = {t.name for t in seqio.get_mixture_or_task(
        f"flan2022_{submix}").tasks}
    assert sub and sub <= flan
    assert {n.rsplit("_", 2)[-2] + "_" + n.rsplit("_", 1)[-1]
            for n in sub} <= set(src.SUBMIX_VARIANTS[submix]), sub


@pytest.mark.parametrize("name", ["flan2022_cot_gsm8k_zs_opt",
                                  "flan2022_cot_aqua_fs_opt",
                                  "flan2022_niv2_export_zs_opt",
                                  "flan2022_t0_export_fs_noopt"])
def test_file_tasks_pack(local_data, name):
  batch = _packed_batch(seqio.get_mixture_or_task(name))
  assert batch["encoder_input_tokens"].shape == (2, LENGTHS["inputs"])
  assert batch["encoder_segment_ids"].max() >= 1


def test_cot_fewshot_text(local_data):
  task = seqio.get_mixture_or_task("flan2022_cot_gsm8k_fs_opt")
  ex = next(iter(task.get_dataset(None, split="train", shuffle=False,
                                  try_in_mem_cache=False).as_numpy_iterator()))
  inputs = ex["inputs_pretokenized"].decode()
  assert inputs.count("So the answer is") == flan2022.NUM_SHOTS
  assert "\\n" not in inputs and "\nOptions: x y" in inputs
  assert ex["targets_pretokenized"].decode().endswith("So the answer is 0.")


@pytest.fixture
def mock_shards(monkeypatch):
  """Mocked TFDS data has no split metadata; FewshotDataSource lists shards."""
  monkeypatch.setattr(seqio.TfdsDataSource, "list_shards",
                      lambda self, split: ["mock-shard"])


@pytest.mark.parametrize("name", ["flan2022_flan2021_rte_zs_opt",
                                  "flan2022_flan2021_piqa_fs_noopt",
                                  "flan2022_flan2021_squad_v1_zs_noopt",
                                  "flan2022_t0_cosmos_qa_fs_opt"])
def test_tfds_tasks_pack(name, mock_shards):
  with tfds.testing.mock_data(num_examples=6,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    batch = _packed_batch(seqio.get_mixture_or_task(name))
  assert batch["decoder_target_tokens"].shape == (2, LENGTHS["targets"])
  assert batch["encoder_segment_ids"].max() >= 1


def test_options_block_only_in_opt_variants(mock_shards):
  with tfds.testing.mock_data(num_examples=4,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    for variant, expect in (("zs_opt", True), ("zs_noopt", False)):
      task = seqio.get_mixture_or_task(f"flan2022_flan2021_rte_{variant}")
      for ex in task.get_dataset(None, split="train", shuffle=False,
                                 try_in_mem_cache=False).as_numpy_iterator():
        text = ex["inputs_pretokenized"].decode()
        assert ("OPTIONS:\n- yes\n- no" in text) == expect, text
        assert ex["targets_pretokenized"].decode() in ("yes", "no")


def _fake_sizes(name):
  return 1000 + 7919 * (sum(map(ord, name)) % 40)


def _expected_rates(caps, weights):
  """Independent, as FLAN's mixtures.py + run_example.py: weight[s] /
  (variants of s) * size / (sum of sizes of the same variant of s), where
  size = min(n, cap[s]) (exports are capped inside, by task)."""
  per = {}
  for name in seqio.TaskRegistry.names():
    if name.startswith("flan2022_"):
      submix = next(s for s in src.SUBMIXES if name.startswith(
          f"flan2022_{s}_"))
      variant = "_".join(name.split("_")[-2:])
      n = _fake_sizes(name)
      per.setdefault(submix, {}).setdefault(variant, {})[name] = (
          n if "_export_" in name else min(n, caps[submix]))
  return {n: weights[s] / len(vs) * size / sum(d.values())
          for s, vs in per.items() for d in vs.values()
          for n, size in d.items()}


@pytest.mark.parametrize("bindings", [
    "", "mixing.caps = {'flan2021': 3000, 't0': 2000, 'niv2': 500, "
        "'cot': 9000, 'dialog': 20000}\n"
        "mixing.weights = {'flan2021': 1, 't0': 1, 'niv2': 1, 'cot': 1, "
        "'dialog': 1}"])
def test_mixture_rates_capped_example_proportional(monkeypatch, bindings):
  monkeypatch.setattr(seqio.Task, "num_input_examples",
                      lambda self, split: _fake_sizes(self.name))
  gin.clear_config()
  try:
    gin.parse_config(bindings.replace("mixing.", "tasks.flan2022.mixing."))
    caps, weights = flan2022.mixing()
    if bindings:
      assert caps["t0"] == 2000 and weights["cot"] == 1
    expected = _expected_rates(caps, weights)
    mix = seqio.get_mixture_or_task("flan2022")
    assert {t.name for t in mix.tasks} == set(expected)
    for task in mix.tasks:
      assert mix.get_rate(task) == pytest.approx(expected[task.name])
    total = sum(expected.values())
    assert total == pytest.approx(sum(weights.values()))
  finally:
    gin.clear_config()


def test_mixing_knobs_validated():
  with pytest.raises(ValueError, match="mixing.caps"):
    flan2022.mixing(caps={"t0": 1})
  with pytest.raises(ValueError, match="mixing.weights"):
    flan2022.mixing(weights=dict(flan2022.DEFAULT_WEIGHTS, t0=0))


def test_malformed_lines_named(tmp_path):
  bad_json = tmp_path / "a.jsonl"
  bad_json.write_text('{"inputs": "x", "targets": "y"}\n\n{oops\n')
  with pytest.raises(ValueError, match=f"{bad_json}:3: not valid JSON"):
    list(file_sources.read_lines(str(bad_json), ("inputs", "targets")))
  missing = tmp_path / "b.jsonl"
  missing.write_text('{"inputs": "x"}\n')
  with pytest.raises(ValueError, match=r"b.jsonl:1: missing field\(s\) "
                     r"\['targets'\]"):
    list(file_sources.read_lines(str(missing), ("inputs", "targets")))
  tsv = tmp_path / "c.tsv"
  tsv.write_text("q\ta\tr\nq\ta\n")
  with pytest.raises(ValueError, match="c.tsv:2: expected 3"):
    list(file_sources.read_lines(str(tsv), src.COT_FIELDS))


def test_tfrecord_source(tmp_path, monkeypatch):
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path))
  rows = [{"inputs": f"question {i}", "targets": f"answer {i}"}
          for i in range(3)]
  for name, records in (("good", rows), ("bad", rows + [{}])):
    with tf.io.TFRecordWriter(str(tmp_path / f"{name}.tfrecord")) as w:
      for r in records:
        w.write(tf.train.Example(features=tf.train.Features(feature={
            k: tf.train.Feature(bytes_list=tf.train.BytesList(
                value=[v.encode()])) for k, v in r.items()
        })).SerializeToString())
  source = file_sources.FileDataSource(
      {"train": "good.tfrecord", "validation": "bad.tfrecord"},
      ("inputs", "targets"), "test data")
  assert source.examples("train") == rows
  assert source.num_input_examples("train") == 3
  with pytest.raises(ValueError, match=r"bad.tfrecord: record 4: missing"):
    source.examples("validation")
  with pytest.raises(ValueError, match="split_files"):
    file_sources.FileDataSource({"train": "d.csv"}, ("inputs",), "x")


def test_missing_data_fails_at_first_use(tmp_path, monkeypatch):
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path))
  task = seqio.get_mixture_or_task("flan2022_cot_creak_zs_opt")
  with pytest.raises(FileNotFoundError) as e:
    task.get_dataset(None, split="train", try_in_mem_cache=False)
  assert str(tmp_path / "flan_cot" / "creak_train.tsv") in str(e.value)
  assert data_dir.ENV_VAR in str(e.value)


def test_unknown_name_lists_close_names():
  with pytest.raises(ValueError, match="flan2022_cot"):
    tasks.get_mixture_or_task("flan2022_cott")
  assert tasks.get_mixture_or_task("flan2022").name == "flan2022"


def test_import_takes_no_network():
  code = ("import socket\n"
          "def refuse(*a, **k): raise OSError('network used')\n"
          "socket.socket.connect = refuse\n"
          "socket.create_connection = refuse\n"
          "socket.getaddrinfo = refuse\n"
          "import seqio, tasks\n"
          "n = len(seqio.TaskRegistry.names())\n"
          "assert 'flan2022' in seqio.MixtureRegistry.names()\n"
          "assert 'mmlu_5shot' in seqio.MixtureRegistry.names()\n"
          "assert 'bbh_cot' in seqio.MixtureRegistry.names()\n"
          "print('OK', n)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=300, check=False,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "OK" in out.stdout


def test_cot_submixture_rates_from_files(local_data):
  """Real line counts of the written TSVs, capped by a gin-bound cap."""
  gin.clear_config()
  try:
    gin.bind_parameter("tasks.flan2022.mixing.caps",
                       dict(flan2022.DEFAULT_CAPS, cot=10))
    mix = seqio.get_mixture_or_task("flan2022_cot")
    sizes = [min(8 + i, 10) for i in range(len(src.COT_DATASETS))]
    variants = len(src.SUBMIX_VARIANTS["cot"])
    for task in mix.tasks:
      i = src.COT_DATASETS.index(task.name.split("_")[2])
      assert mix.get_rate(task) == pytest.approx(
          sizes[i] / sum(sizes) / variants), task.name
  finally:
    gin.clear_config()


def test_every_file_task_and_cot_mixture_pack(local_data):
  names = [n for n in seqio.TaskRegistry.names()
           if n.startswith("flan2022_") and ("_export_" in n or
                                            n.startswith("flan2022_cot_"))]
  assert len(names) == 14 + 12
  for name in names:
    assert _packed_batch(seqio.get_mixture_or_task(name))[
        "encoder_segment_ids"].max() >= 1, name
  ds = seqio.get_dataset("flan2022_cot", LENGTHS, dataset_split="train",
                         shuffle=False, feature_converter=seqio
                         .EncDecFeatureConverter(pack=True))
  assert next(iter(ds.as_numpy_iterator()))["encoder_segment_ids"].max() >= 1
