"""FLAN chain-of-thought TSVs streamed through the line index, as the JSONL
exports are: one indexing pass (cached), order-free shuffling, each host
parsing only its share, malformed lines named; and the user's real files
when the data directory holds them."""

import collections
import os
import random

import gin
import numpy as np
import pytest
import seqio

import tasks  # noqa: F401  # registers everything
from tasks import capped_source
from tasks import data_dir
from tasks import file_sources
from tasks import flan2022
from tasks import flan2022_sources as src
from tasks import line_formats
from tasks import line_index

LENGTHS = {"inputs": 128, "targets": 32}


def _tsv_rows(n, name="gsm8k"):
  return [f"{name} q{j}?\\nOptions: x y\t{j}\tbecause {j}." for j in range(n)]


def _write(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(rows) + "\n")


def _stream(source, shard=None, seed=5):
  ds = source.get_dataset("train", shuffle=True, seed=seed, shard_info=shard)
  return [ex["question"].decode() for ex in ds.as_numpy_iterator()]


@pytest.fixture
def data(tmp_path, monkeypatch):
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path))
  return tmp_path


def _counting_tsv_parser(monkeypatch):
  """Counts the lines parsed as TSV from here on."""
  calls = collections.Counter()
  real = line_formats.PARSERS["tsv"]

  def counting(line, fields, where):
    calls["lines"] += 1
    return real(line, fields, where)

  monkeypatch.setitem(line_formats.PARSERS, "tsv", counting)
  return calls


def test_cot_task_reads_its_tsv_through_the_line_index(data, monkeypatch):
  rows = _tsv_rows(12)
  path = data / src.cot_file("gsm8k")
  _write(path, rows)
  task = seqio.get_mixture_or_task("flan2022_cot_gsm8k_zs_opt")
  assert isinstance(task.source, capped_source.CappedFileSource)
  assert task.num_input_examples("train") == 12
  assert os.path.exists(str(path) + line_index.INDEX_SUFFIX)
  # Each epoch holds every line once, in an order set by the lines' hashes.
  source = task.source
  first = _stream(source)
  assert sorted(first) == sorted(r.split("\t")[0] for r in rows)
  assert first != [r.split("\t")[0] for r in rows]
  random.Random(1).shuffle(rows)
  _write(path, rows)
  os.utime(path, ns=(1, 1))  # a new version of the file: re-indexed
  assert _stream(source) == first
  # With the index cached, host 1 of 3 parses its 4 lines only.
  calls = _counting_tsv_parser(monkeypatch)
  share = _stream(source, seqio.ShardInfo(1, 3))
  assert share == first[1::3] and calls["lines"] == 4
  # The task's examples are the rendered question and the reasoning.
  ex = next(iter(task.get_dataset(None, split="train", shuffle=False,
                                  try_in_mem_cache=False).as_numpy_iterator()))
  assert "\nOptions: x y" in ex["inputs_pretokenized"].decode()
  assert ex["targets_pretokenized"].decode().startswith("because ")


def test_tsv_lines_checked_once_when_indexed(data, monkeypatch):
  path = data / "cot.tsv"
  _write(path, _tsv_rows(3) + ["", "q\ta"])
  with pytest.raises(ValueError, match=f"{path}:5: expected 3 tab-separated "
                     "columns"):
    line_index.build(str(path), src.COT_FIELDS)
  _write(path, _tsv_rows(3) + ["", "\t", "q\ta\tr"])  # blank lines skipped
  index = line_index.load_or_build(str(path), src.COT_FIELDS)
  assert index.counts() == {"": 4} and index.offsets.tolist()[3] == sum(
      len(r.encode()) + 1 for r in _tsv_rows(3) + ["", "\t"])
  calls = _counting_tsv_parser(monkeypatch)
  again = line_index.load_or_build(str(path), src.COT_FIELDS)
  assert calls["lines"] == 0  # from the cache
  np.testing.assert_array_equal(again.fingerprints, index.fingerprints)
  # A cache built for other fields is not taken for these.
  assert line_index.load_or_build(str(path), ("a", "b", "c")).counts() == {
      "": 4} and calls["lines"] == 4
  with pytest.raises(ValueError, match="task_field and cap go together"):
    capped_source.CappedFileSource("cot.tsv", src.COT_FIELDS, "x",
                                   task_field="question")
  with pytest.raises(ValueError, match=r"unknown line format 'csv'"):
    capped_source.CappedFileSource("cot.csv", src.COT_FIELDS, "x")


def test_a_tsv_of_several_tasks_mixes_by_task(data):
  """The same per-task caps as a JSONL export, on a TSV with a task
  column."""
  fields = ("inputs", "targets", "task")
  sizes = {"a": 9, "b": 2, "c": 5}
  rows = [f"{t} {j}\tans\t{t}" for t, n in sizes.items() for j in range(n)]
  _write(data / "mix.tsv", rows)
  source = capped_source.CappedFileSource(
      "mix.tsv", fields, "test", task_field="task", cap=lambda: 4)
  assert source.task_counts() == sizes
  assert source.num_input_examples("train") == 4 + 2 + 4
  ds = source.get_dataset("train", shuffle=True, seed=0)
  got = collections.Counter(ex["task"].decode()
                            for ex in ds.as_numpy_iterator())
  assert got == {"a": 4, "b": 2, "c": 4}


def _real_cot_dir(tmp_path, monkeypatch):
  """The user's FLAN CoT files linked into a data dir under tmp_path (so
  that their line indices are cached here, not in the user's folder)."""
  root = data_dir.data_dir()
  if not os.path.exists(os.path.join(root, src.cot_file("gsm8k"))):
    pytest.skip(f"no FLAN CoT data under {root}")
  (tmp_path / "flan_cot").mkdir()
  for name in src.COT_DATASETS:
    os.symlink(os.path.join(root, src.cot_file(name)),
               tmp_path / src.cot_file(name))
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path))
  return tmp_path


def test_real_flan_cot_files_stream_as_read_whole(tmp_path, monkeypatch):
  root = _real_cot_dir(tmp_path, monkeypatch)
  sizes = {}
  for name in src.COT_DATASETS:
    whole = list(file_sources.read_lines(str(root / src.cot_file(name)),
                                         src.COT_FIELDS))
    source = seqio.get_mixture_or_task(f"flan2022_cot_{name}_zs_opt").source
    sizes[name] = source.num_input_examples("train")
    assert sizes[name] == len(whole) > 1000, name
    if name == "gsm8k":
      # An epoch is a permutation of the file's lines; the stream reads
      # the rows of that order (checked on its first 300: tf.data is slow
      # per example).
      order = capped_source.epoch_lines(source.index(), None, seed=0,
                                        epoch=0, shuffle=True)
      assert sorted(order.tolist()) == list(range(len(whole)))
      ds = source.get_dataset("train", shuffle=True, seed=0).take(300)
      streamed = [{k: v.decode() for k, v in ex.items()}
                  for ex in ds.as_numpy_iterator()]
      assert streamed == [whole[i] for i in order[:300]]
      assert order[:300].tolist() != list(range(300))
  gin.clear_config()
  try:
    cap = 3000
    gin.bind_parameter("tasks.flan2022.mixing.caps",
                       dict(flan2022.DEFAULT_CAPS, cot=cap))
    capped = {n: min(k, cap) for n, k in sizes.items()}
    mix = seqio.get_mixture_or_task("flan2022_cot")
    variants = src.SUBMIX_VARIANTS["cot"]
    for task in mix.tasks:
      name = task.name.split("_")[2]
      assert mix.get_rate(task) == pytest.approx(
          capped[name] / sum(capped.values()) / len(variants)), task.name
  finally:
    gin.clear_config()
  task = seqio.get_mixture_or_task("flan2022_cot_gsm8k_zs_opt")
  ds = seqio.EncDecFeatureConverter(pack=True)(task.get_dataset(
      LENGTHS, split="train", shuffle=False, try_in_mem_cache=False),
      LENGTHS)
  batch = next(iter(ds.batch(2).as_numpy_iterator()))
  assert batch["encoder_segment_ids"].max() >= 1
