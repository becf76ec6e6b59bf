"""FLAN 2022 mixing by task: JSONL files of several tasks, per-task caps,
order-free shuffling, host sharding, the cached line index."""

import collections
import json
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
from tasks import line_index

FIELDS = ("inputs", "targets", "task_name", "template_type")
SIZES = {"big": 40, "small": 4, "mid": 15}


def _rows(sizes=SIZES):
  """Rows grouped by task (the file order a naive reader would keep)."""
  return [{"inputs": f"{t} question {j}", "targets": f"{t} answer {j}",
           "task_name": t, "template_type": "zs_opt"}
          for t, n in sizes.items() for j in range(n)]


def _write(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _source(relative, cap=10):
  return capped_source.CappedFileSource(relative, FIELDS, "test",
                                        task_field="task_name",
                                        cap=lambda: cap)


def _epochs(source, epochs=1, shard=None, seed=7, shuffle=True):
  ds = source.get_dataset("train", shuffle=shuffle, seed=seed,
                          shard_info=shard)
  return [[ex["inputs"].decode() for ex in ds.as_numpy_iterator()]
          for _ in range(epochs)]


@pytest.fixture
def data(tmp_path, monkeypatch):
  monkeypatch.setenv(data_dir.ENV_VAR, str(tmp_path))
  return tmp_path


def test_epoch_holds_min_of_task_size_and_cap(data):
  _write(data / "mix.jsonl", _rows())
  source = _source("mix.jsonl", cap=10)
  assert source.task_counts() == SIZES
  assert source.capped_counts() == {"big": 10, "small": 4, "mid": 10}
  assert source.num_input_examples("train") == 24
  first, second = _epochs(source, epochs=2)
  for epoch in (first, second):
    per_task = collections.Counter(x.split()[0] for x in epoch)
    assert per_task == {"big": 10, "small": 4, "mid": 10}
    assert len(set(epoch)) == len(epoch)
  # A repeat draws a fresh subset of the capped task, in a fresh order.
  assert ({x for x in first if x.startswith("big")} !=
          {x for x in second if x.startswith("big")})
  assert first != second


def test_shuffle_does_not_depend_on_file_order(data):
  rows = _rows()
  _write(data / "grouped.jsonl", rows)
  random.Random(0).shuffle(rows)
  _write(data / "shuffled.jsonl", rows)
  grouped = _epochs(_source("grouped.jsonl"), epochs=2)
  assert grouped == _epochs(_source("shuffled.jsonl"), epochs=2)
  # The grouped file's tasks are interleaved, not read block by block.
  assert len({x.split()[0] for x in grouped[0][:8]}) > 1
  # Without shuffling: the file's order, same capped counts.
  plain = _epochs(_source("grouped.jsonl"), shuffle=False)[0]
  assert plain == sorted(plain, key=[r["inputs"] for r in _rows()].index)


def test_hosts_read_disjoint_shares_of_one_epoch(data):
  _write(data / "mix.jsonl", _rows())
  source = _source("mix.jsonl")
  whole = _epochs(source)[0]
  shares = [_epochs(source, shard=seqio.ShardInfo(j, 3))[0]
            for j in range(3)]
  assert [len(s) for s in shares] == [8, 8, 8]
  assert sorted(sum(shares, [])) == sorted(whole)
  assert shares[1] == whole[1::3]


def test_index_cached_and_rebuilt_when_the_file_changes(data, monkeypatch):
  path = data / "mix.jsonl"
  _write(path, _rows())
  first = line_index.load_or_build(str(path), FIELDS, "task_name")
  assert os.path.exists(str(path) + line_index.INDEX_SUFFIX)
  with open(path, "rb") as f:
    f.seek(int(first.offsets[5]))
    assert json.loads(f.readline())["inputs"] == "big question 5"
  real_build = line_index.build

  def refuse(*args):
    raise AssertionError("re-indexed an unchanged file")

  monkeypatch.setattr(line_index, "build", refuse)
  again = line_index.load_or_build(str(path), FIELDS, "task_name")
  assert again.counts() == SIZES
  np.testing.assert_array_equal(again.fingerprints, first.fingerprints)
  _write(path, _rows({"big": 3, "other": 2}))
  os.utime(path, ns=(1, 1))
  monkeypatch.setattr(line_index, "build", real_build)
  assert line_index.load_or_build(str(path), FIELDS, "task_name").counts() == {
      "big": 3, "other": 2}


def test_bad_lines_named(data):
  path = data / "bad.jsonl"
  path.write_text(json.dumps(_rows()[0]) + '\n\n{oops\n')
  with pytest.raises(ValueError, match=f"{path}:3: not valid JSON"):
    line_index.build(str(path), FIELDS, "task_name")
  # Every field is checked when the file is indexed, not when read.
  path.write_text(json.dumps(dict(_rows()[0], task_name="a")) + "\n" +
                  '{"inputs": "x", "targets": "y", "template_type": "z"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'task_name'"):
    line_index.build(str(path), FIELDS, "task_name")


def _export_rows(submix, variant, sizes):
  return [dict(r, inputs=f"{submix} {variant} {r['inputs']}",
               template_type=variant) for r in _rows(sizes)]


def test_export_tasks_mix_by_task_with_gin_caps(data):
  """niv2's two variant files, 3 tasks each; cap 5 per task from gin."""
  sizes = {"zs_opt": {"t1": 12, "t2": 3, "t3": 7},
           "fs_opt": {"t1": 2, "t4": 30}}
  for variant, per in sizes.items():
    _write(data / src.export_file("niv2", variant),
           _export_rows("niv2", variant, per))
  gin.clear_config()
  try:
    gin.bind_parameter("tasks.flan2022.mixing.caps",
                       dict(flan2022.DEFAULT_CAPS, niv2=5))
    mix = seqio.get_mixture_or_task("flan2022_niv2")
    zs = seqio.get_mixture_or_task("flan2022_niv2_export_zs_opt")
    fs = seqio.get_mixture_or_task("flan2022_niv2_export_fs_opt")
    assert zs.num_input_examples("train") == 5 + 3 + 5
    assert fs.num_input_examples("train") == 2 + 5
    # Each variant is alone in its group: half the sub-mixture each.
    assert mix.get_rate(zs) == pytest.approx(0.5)
    top = seqio.get_mixture_or_task("flan2022")
    assert top.get_rate(fs) == pytest.approx(
        flan2022.DEFAULT_WEIGHTS["niv2"] / 2)
    ds = zs.get_dataset(None, split="train", shuffle=True, seed=1,
                        try_in_mem_cache=False)
    names = collections.Counter(
        ex["inputs_pretokenized"].decode().split()[2]
        for ex in ds.as_numpy_iterator())
    assert names == {"t1": 5, "t2": 3, "t3": 5}
  finally:
    gin.clear_config()


def test_real_flan_cot_files_as_one_multi_task_file(tmp_path):
  """The user's 7 FLAN CoT TSVs joined into one JSONL (task = file): each
  epoch holds min(lines, cap) of each, as counted from the files."""
  root = data_dir.data_dir()
  if not os.path.exists(os.path.join(root, src.cot_file("gsm8k"))):
    pytest.skip(f"no FLAN CoT data under {root}")
  rows, lines = [], {}
  for name in src.COT_DATASETS:
    examples = list(file_sources.read_lines(
        os.path.join(root, src.cot_file(name)), src.COT_FIELDS))
    lines[name] = len(examples)
    rows += [{"inputs": e["question"], "targets": e["answer"],
              "task_name": name, "template_type": "zs_opt"}
             for e in examples]
  _write(tmp_path / "cot.jsonl", rows)
  cap = 3000
  index = line_index.load_or_build(str(tmp_path / "cot.jsonl"), FIELDS,
                                   "task_name")
  assert index.counts() == lines
  epoch = capped_source.epoch_lines(index, cap, seed=0, epoch=0,
                                    shuffle=True)
  got = collections.Counter(index.names[g] for g in index.groups[epoch])
  assert got == {n: min(k, cap) for n, k in lines.items()}
  assert len(set(epoch.tolist())) == len(epoch)
