"""SeqIO registration of the built-in `mini_flan` instruction suite.

Registered names (see tasks/README.md):
  mini_flan_<task>_zs            zero-shot, options block where the task has one
  mini_flan_<task>_zs_noopt      zero-shot without options (option tasks only)
  mini_flan_<task>_fs            few-shot (NUM_SHOTS solved examples first)
  mini_flan_<task>_rank          zero-shot rank classification (option tasks):
                                 one scored row per option, `rank_accuracy`
  mixtures: mini_flan, mini_flan_<cluster>, mini_flan_train_without_<cluster>,
            (<cluster>: a generator cluster or a STUDY_CLUSTERS group),
            mini_flan_eval_<cluster> (zero-shot variants of the held-out
            cluster), mini_flan_eval_options (every option task, generated
            answers and rank classification)
  main job:  mini_flan_main (train: zero-shot variants of MAIN_HELD_IN),
             mini_flan_main_eval = mini_flan_main_held_in +
             mini_flan_main_held_out (zero-shot and rank tasks of
             MAIN_HELD_IN / MAIN_HELD_OUT)
  mini_flan_span_corruption, mini_flan_prefix_lm  (pre-training corpus)
"""

import functools
from typing import Dict, Mapping, Optional, Tuple

import seqio
import tensorflow as tf

from tasks import metrics
from tasks import mini_flan_generators as gen
from tasks import objectives
from tasks import suites

DEFAULT_VOCABULARY = seqio.ByteVocabulary()
NUM_SHOTS = 2
DEFAULT_SEED = 0
PRETRAIN_SPLIT_SIZES = {"train": 2000, "validation": 100, "test": 100}
# The main job (gin/runs/mini_flan_cpu.gin): tasks a tiny model learns in a
# few hundred steps, and a cluster it never trains on.
MAIN_HELD_IN = ("sign", "parity", "palindrome")
MAIN_HELD_OUT = ("location_entailment", "comparison_entailment")
# Held-out groups of the experiments/ study's earlier design (its 1,000-step
# fine-tuning learns them; experiments/README.md), registered with the same
# mixtures as a generator cluster (mini_flan_<group>, ...).
STUDY_CLUSTERS: Mapping[str, Tuple[str, ...]] = {
    "rules": ("sign", "parity", "palindrome"),
    "location": ("location_entailment",),
    "word_count": ("count_words",),
}


def output_features(vocabulary: seqio.Vocabulary = DEFAULT_VOCABULARY
                    ) -> Dict[str, seqio.Feature]:
  return {
      "inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
      "targets": seqio.Feature(vocabulary, add_eos=True),
  }


def _text_dataset(split: str, shuffle_files: bool, seed: Optional[int] = None,
                  *, task: gen.GenTask, num_shots: int, with_options: bool,
                  data_seed: int, sizes: Mapping[str, int]) -> tf.data.Dataset:
  # Generation order is fixed by `data_seed`; seqio shuffles with `seed`.
  del shuffle_files, seed
  examples = list(gen.generate_examples(task, split, data_seed, sizes[split],
                                        num_shots, with_options))
  return tf.data.Dataset.from_tensor_slices({
      "inputs": [e["inputs"] for e in examples],
      "targets": [e["targets"] for e in examples],
  })


def _option_rows(split: str, shuffle_files: bool, seed: Optional[int] = None,
                 *, task: gen.GenTask, data_seed: int,
                 sizes: Mapping[str, int]) -> tf.data.Dataset:
  """The zero-shot examples of an option task, one row per option."""
  del shuffle_files, seed
  return suites.option_rows(
      gen.generate_examples(task, split, data_seed, sizes[split]),
      rank_task_name(task))


def rank_task_name(task: gen.GenTask) -> str:
  return f"mini_flan_{task.name}_rank"


def instruction_task_names(task: gen.GenTask) -> Dict[str, str]:
  """Variant -> registered task name for one generated task."""
  names = {"zs": f"mini_flan_{task.name}_zs", "fs": f"mini_flan_{task.name}_fs"}
  if task.has_options:
    names["zs_noopt"] = f"mini_flan_{task.name}_zs_noopt"
  return names


def register(seed: int = DEFAULT_SEED,
             split_sizes: Mapping[str, int] = gen.DEFAULT_SPLIT_SIZES,
             vocabulary: seqio.Vocabulary = DEFAULT_VOCABULARY) -> None:
  """Registers every mini_flan task and mixture (duplicates raise)."""
  features = output_features(vocabulary)
  preprocessors = [seqio.preprocessors.tokenize,
                   seqio.CacheDatasetPlaceholder(),
                   seqio.preprocessors.append_eos_after_trim]
  all_names, by_task, option_evals = [], {}, []
  for task in gen.TASKS:
    for variant, name in instruction_task_names(task).items():
      fn = functools.partial(
          _text_dataset, task=task,
          num_shots=NUM_SHOTS if variant == "fs" else 0,
          with_options=variant != "zs_noopt", data_seed=seed,
          sizes=split_sizes)
      seqio.TaskRegistry.add(
          name,
          source=seqio.FunctionDataSource(fn, splits=gen.SPLITS),
          preprocessors=preprocessors,
          output_features=features,
          metric_fns=[metrics.exact_match])
      all_names.append(name)
      by_task.setdefault(task.name, []).append(name)
    if task.has_options:
      seqio.TaskRegistry.add(
          rank_task_name(task),
          source=seqio.FunctionDataSource(
              functools.partial(_option_rows, task=task, data_seed=seed,
                                sizes=split_sizes), splits=gen.SPLITS),
          preprocessors=preprocessors,
          output_features=features,
          postprocess_fn=suites.option_row_target,
          metric_fns=[metrics.option_rank_accuracy])
      option_evals += [instruction_task_names(task)["zs"],
                       rank_task_name(task)]
  seqio.MixtureRegistry.add("mini_flan", all_names, default_rate=1.0)
  for cluster, task_names in cluster_tasks().items():
    members = [n for t in task_names for n in by_task[t]]
    seqio.MixtureRegistry.add(  # the few-shot variants of a held-out cluster
        f"mini_flan_eval_fs_{cluster}",
        [n for n in members if n.endswith("_fs")], default_rate=1.0)
    seqio.MixtureRegistry.add(f"mini_flan_{cluster}", members,
                              default_rate=1.0)
    seqio.MixtureRegistry.add(
        f"mini_flan_train_without_{cluster}",
        [n for n in all_names if n not in members], default_rate=1.0)
    seqio.MixtureRegistry.add(
        f"mini_flan_eval_{cluster}",
        [n for n in members if not n.endswith("_fs")], default_rate=1.0)
  seqio.MixtureRegistry.add("mini_flan_eval_options", option_evals,
                            default_rate=1.0)
  _register_main_job()
  _register_pretraining(seed, features)


def cluster_tasks() -> Dict[str, Tuple[str, ...]]:
  """Every held-out group -> its task names: the generator's clusters
  (`mini_flan_generators.CLUSTERS`) and `STUDY_CLUSTERS`.

  Raises:
    ValueError: a STUDY_CLUSTERS group that reuses a cluster's name or names
      an unknown task.
  """
  out = {c: tuple(t.name for t in gen.TASKS if t.cluster == c)
         for c in gen.CLUSTERS}
  for group, names in STUDY_CLUSTERS.items():
    unknown = [n for n in names if n not in gen.TASKS_BY_NAME]
    if group in out or unknown or not names:
      raise ValueError(f"mini_flan.STUDY_CLUSTERS[{group!r}]: needs a name "
                       f"no generator cluster has and known tasks; "
                       f"clusters {list(out)}, unknown tasks {unknown}")
    out[group] = tuple(names)
  return out


def _zero_shot_and_rank(names) -> list:
  out = []
  for task in (gen.TASKS_BY_NAME[n] for n in names):
    out.append(instruction_task_names(task)["zs"])
    if task.has_options:
      out.append(rank_task_name(task))
  return out


def _register_main_job() -> None:
  seqio.MixtureRegistry.add(
      "mini_flan_main",
      [instruction_task_names(gen.TASKS_BY_NAME[n])["zs"]
       for n in MAIN_HELD_IN], default_rate=1.0)
  for part, names in (("held_in", MAIN_HELD_IN),
                      ("held_out", MAIN_HELD_OUT)):
    seqio.MixtureRegistry.add(f"mini_flan_main_{part}",
                              _zero_shot_and_rank(names), default_rate=1.0)
  seqio.MixtureRegistry.add(
      "mini_flan_main_eval", ["mini_flan_main_held_in",
                              "mini_flan_main_held_out"], default_rate=1.0)


def _corpus_dataset(split: str, shuffle_files: bool,
                    seed: Optional[int] = None, *,
                    data_seed: int) -> tf.data.Dataset:
  del shuffle_files, seed
  docs = list(gen.pretraining_corpus(data_seed, split,
                                     PRETRAIN_SPLIT_SIZES[split]))
  return tf.data.Dataset.from_tensor_slices({"text": docs})


def _register_pretraining(seed: int, features: Mapping[str, seqio.Feature]
                          ) -> None:
  source = seqio.FunctionDataSource(
      functools.partial(_corpus_dataset, data_seed=seed), splits=gen.SPLITS)
  for objective in objectives.OBJECTIVES:
    objectives.register_pretraining_task(f"mini_flan_{objective}", source,
                                         objective, features)
