"""Vocabulary by gin, SentencePiece training, objectives on any text task."""

import os
import subprocess
import sys

import gin
import sentencepiece as spm
import numpy as np
import pytest
import seqio
import tensorflow as tf

from tasks import objectives
from tasks import train_vocab
from tasks import vocab


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  root = tmp_path_factory.mktemp("spm")
  text = root / "corpus.txt"
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "router", "expert", "token"]
  text.write_text("\n".join(" ".join(rng.choice(words, 8))
                            for _ in range(300)) + "\n")
  out = subprocess.run(
      [sys.executable, "-m", "tasks.train_vocab", "--output",
       str(root / "spm"), "--vocab_size", "40", str(text)],
      capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, PYTHONPATH=os.getcwd()))
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.strip().splitlines()[-1]


def test_trained_model_t5_conventions(spm_model):
  v = seqio.SentencePieceVocabulary(spm_model, extra_ids=5)
  assert (v.pad_id, v.eos_id, v.unk_id) == (train_vocab.PAD_ID,
                                            train_vocab.EOS_ID,
                                            train_vocab.UNK_ID) == (0, 1, 2)
  base = spm.SentencePieceProcessor(model_file=spm_model).get_piece_size()
  assert v.vocab_size == base + 5
  ids = v.encode("router expert token")
  assert ids and min(ids) > 2 and v.decode(ids) == "router expert token"


def test_gin_selects_vocabulary(spm_model):
  assert isinstance(vocab.ConfiguredVocabulary().inner, seqio.ByteVocabulary)
  gin.clear_config()
  try:
    gin.bind_parameter("make_vocabulary.kind", "sentencepiece")
    gin.bind_parameter("make_vocabulary.sentencepiece_path", spm_model)
    gin.bind_parameter("make_vocabulary.extra_ids", 3)
    configured = vocab.ConfiguredVocabulary()
    direct = seqio.SentencePieceVocabulary(spm_model, extra_ids=3)
    assert configured.vocab_size == direct.vocab_size
    assert configured.encode("beta gamma") == direct.encode("beta gamma")
    np.testing.assert_array_equal(configured.encode_tf("beta").numpy(),
                                  direct.encode_tf("beta").numpy())
  finally:
    gin.clear_config()


def test_vocabulary_knobs_validated():
  with pytest.raises(ValueError, match="make_vocabulary.kind"):
    vocab.make_vocabulary(kind="wordpiece")
  with pytest.raises(ValueError, match="sentencepiece_path"):
    vocab.make_vocabulary(kind="sentencepiece")
  with pytest.raises(ValueError, match="vocab_size"):
    train_vocab.train(["x.txt"], "/tmp/never", 2)


@pytest.mark.parametrize("objective", objectives.OBJECTIVES)
def test_objectives_on_any_text_task(objective):
  docs = ["the router sends each token to its top experts " * 3,
          "capacity factor bounds the tokens per expert " * 3]
  source = seqio.FunctionDataSource(
      lambda split, shuffle_files: tf.data.Dataset.from_tensor_slices(
          {"body": docs}), splits=("train",))
  v = seqio.ByteVocabulary()
  features = {"inputs": seqio.Feature(v), "targets": seqio.Feature(v)}
  name = f"test_objective_{objective}"
  task = objectives.register_pretraining_task(name, source, objective,
                                              features, text_key="body")
  try:
    for doc, ex in zip(docs, task.get_dataset(
        None, split="train", shuffle=False,
        try_in_mem_cache=False).as_numpy_iterator()):
      ids = v.encode(doc)
      inputs, targets = list(ex["inputs"][:-1]), list(ex["targets"][:-1])
      if objective == "prefix_lm":
        assert inputs + targets == ids and inputs and targets
      else:
        sentinels = [t for t in inputs if t >= v.vocab_size - 50]
        assert sentinels and all(s in targets for s in sentinels)
        kept = [t for t in inputs if t < v.vocab_size - 50]
        dropped = [t for t in targets if t < v.vocab_size - 50]
        assert sorted(kept + dropped) == sorted(ids)
  finally:
    seqio.TaskRegistry.remove(name)


def test_unknown_objective():
  with pytest.raises(ValueError, match="objective"):
    objectives.pretraining_preprocessors("mlm")
