"""`import tasks` registers the named tasks/mixtures; they yield packed batches."""

import pytest
import seqio

import tasks  # pylint: disable=unused-import  # registers everything
from tasks import mini_flan
from tasks import mini_flan_generators as gen


def test_held_out_mixtures_partition_clusters():
  groups = mini_flan.cluster_tasks()
  assert set(gen.CLUSTERS) | set(mini_flan.STUDY_CLUSTERS) == set(groups)
  for cluster, members in groups.items():
    train = {t.name for t in seqio.get_mixture_or_task(
        f"mini_flan_train_without_{cluster}").tasks}
    evals = {t.name for t in seqio.get_mixture_or_task(
        f"mini_flan_eval_{cluster}").tasks}
    assert evals and train and not train & evals
    for task in gen.TASKS:
      in_train = any(n.startswith(f"mini_flan_{task.name}_") for n in train)
      assert in_train == (task.name not in members)


def test_study_cluster_named_like_a_generator_cluster_refused(monkeypatch):
  monkeypatch.setattr(mini_flan, "STUDY_CLUSTERS", {"counting": ("sign",)})
  with pytest.raises(ValueError, match="STUDY_CLUSTERS"):
    mini_flan.cluster_tasks()


def test_duplicate_registration_refused():
  with pytest.raises(ValueError):
    tasks.register_all()


@pytest.mark.parametrize("name", ["mini_flan", "mini_flan_span_corruption",
                                  "mini_flan_prefix_lm"])
def test_packed_batches(name):
  ds = seqio.get_dataset(
      name, task_feature_lengths={"inputs": 64, "targets": 16},
      dataset_split="validation", shuffle=False,
      feature_converter=seqio.EncDecFeatureConverter(pack=True))
  batch = next(iter(ds.batch(2).as_numpy_iterator()))
  assert batch["encoder_input_tokens"].shape == (2, 64)
  assert batch["decoder_target_tokens"].shape == (2, 16)
  assert batch["encoder_segment_ids"].max() >= 1


@pytest.mark.parametrize("name", ["mini_flan", "mini_flan_prefix_lm"])
def test_prefix_lm_feature_converter_packs(name):
  ds = seqio.get_dataset(
      name, task_feature_lengths={"inputs": 64, "targets": 64},
      dataset_split="validation", shuffle=False,
      feature_converter=seqio.PrefixLMFeatureConverter(pack=True))
  rows = list(ds.take(8).as_numpy_iterator())
  assert rows[0]["decoder_target_tokens"].shape == (128,)
  if name == "mini_flan":  # Short examples: several share a row.
    assert max(r["decoder_segment_ids"].max() for r in rows) >= 2
  for r in rows:
    # Loss only on the targets part of each packed example.
    assert 0 < r["decoder_loss_weights"].sum() < (
        r["decoder_target_tokens"] > 0).sum()
