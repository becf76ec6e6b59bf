"""The experiment's report: tables (markdown) and plots (PNG) from result rows.

Files written to `ExperimentConfig.reports_to`:
  table.md        the headline differences averaged over the held-out
                  clusters (with baselines), sparse minus dense paired by
                  seed (the paper's claims), the
                  main table (per held-out cluster, model x setting,
                  mean ± sample std over seeds, the constant-answer
                  baseline beside them; paired gains as mean [95%
                  t-interval over seeds]), the routing table (expert usage,
                  drop ratio and load CV before and after instruction
                  tuning) and
                  the ablation table
  main.png        the main table as grouped bars with std error bars
  ablations.png   the ablations (one seed)
  results.jsonl   every result row
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

# Column -> (stage, evaluation) of the main table.
SETTINGS = {
    "untuned zero-shot": ("untuned", "zero_shot"),
    "untuned few-shot": ("untuned", "few_shot"),
    "FT (no IT)": ("finetune", "zero_shot"),
    "IT zero-shot": ("instruct", "zero_shot"),
    "IT few-shot": ("instruct", "few_shot"),
    "IT then FT": ("instruct_finetune", "zero_shot"),
    "IT+CoT zero-shot": ("instruct_cot", "zero_shot"),
    "IT+CoT few-shot": ("instruct_cot", "few_shot"),
}
# The constant-answer baseline of each SETTINGS column: its evaluation.
BASELINE_OF = {column: evaluation
               for column, (_, evaluation) in SETTINGS.items()}
LEARNED = "FT - constant"
# Gain column -> (column, minus column) of SETTINGS, paired by seed.
GAINS = {
    "IT gain on FT": ("IT then FT", "FT (no IT)"),
    "IT gain zero-shot": ("IT zero-shot", "untuned zero-shot"),
    "IT gain few-shot": ("IT few-shot", "untuned few-shot"),
}


def _score(rows: Sequence[dict], stage: str, evaluation: str) -> dict:
  """seed -> score of the rows of `stage` that have `evaluation`."""
  return {r["seed"]: r["evals"][evaluation]["score"] for r in rows
          if r["stage"] == stage and evaluation in r["evals"]}


def _difference(rows: Sequence[dict], first: str, second: Optional[str],
                baseline: Optional[Mapping[str, float]] = None) -> dict:
  """seed -> the score of SETTINGS column `first` minus that of `second`
  (None: minus `baseline`, {evaluation: constant-answer score}), for the
  seeds that have both."""
  a = _score(rows, *SETTINGS[first])
  b = (_score(rows, *SETTINGS[second]) if second is not None else
       dict.fromkeys(a, baseline[BASELINE_OF[first]]))
  return {seed: a[seed] - b[seed] for seed in a if seed in b}


def paired_interval(differences: Sequence[float], level: float = 0.95
                    ) -> tuple[float, float, float]:
  """(mean, low, high): the mean of per-seed differences and its two-sided
  Student-t interval at `level` (n - 1 degrees of freedom; low = high =
  mean for one difference)."""
  from scipy import stats
  mean = float(np.mean(differences))
  if len(differences) < 2:
    return mean, mean, mean
  half = float(stats.t.ppf(0.5 + level / 2, len(differences) - 1) *
               stats.sem(differences))
  return mean, mean - half, mean + half


def _gain_cell(differences: Sequence[float]) -> str:
  if not differences:
    return "–"
  mean, low, high = paired_interval(differences)
  return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}] (n={len(differences)})"


def _cell(values: Sequence[float], digits: int = 1) -> str:
  if not values:
    return "–"
  mean = float(np.mean(values))
  if len(values) == 1:
    return f"{mean:.{digits}f} (n=1)"
  return (f"{mean:.{digits}f} ± {float(np.std(values, ddof=1)):.{digits}f} "
          f"(n={len(values)})")


def _markdown_header(names: Sequence[str]) -> list[str]:
  return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


def main_table(rows: Sequence[dict], models: Sequence[str], cluster: str,
               baseline: Optional[Mapping[str, float]] = None
               ) -> tuple[list[str], dict]:
  """Markdown lines and {model: {column: [values over seeds]}}; with
  `baseline` ({evaluation: constant-answer score}) a first row of the
  constant answer's scores and a column `LEARNED` (FT minus the constant
  answer, per seed)."""
  values = {}
  for model in models:
    mine = [r for r in rows if r["model"] == model and not r["ablation"]]
    pretrain = [r["train_loss"] for r in mine if r["stage"] == "pretrain"
                and r["train_loss"] is not None]
    mine = [r for r in mine if r["cluster"] == cluster]
    columns = {"pre-train CE": pretrain}
    by_seed = {column: _score(mine, stage, evaluation)
               for column, (stage, evaluation) in SETTINGS.items()}
    for column, scores in by_seed.items():
      columns[column] = list(scores.values())
    if baseline is not None:
      columns[LEARNED] = list(_difference(mine, "FT (no IT)", None,
                                          baseline).values())
    for gain, (tuned, plain) in GAINS.items():
      columns[gain] = list(_difference(mine, tuned, plain).values())
    values[model] = columns
  header = ["model", *next(iter(values.values()))]
  lines = _markdown_header(header)
  if baseline is not None:
    lines.append("| constant answer | " + " | ".join(
        f"{baseline[BASELINE_OF[c]]:.1f}" if c in BASELINE_OF else "–"
        for c in header[1:]) + " |")
  for model, columns in values.items():
    cells = [_gain_cell(v) if name in GAINS or name == LEARNED else
             _cell(v, 3 if name == "pre-train CE" else 1)
             for name, v in columns.items()]
    lines.append(f"| {model} | " + " | ".join(cells) + " |")
  return lines, values


# Headline column -> (SETTINGS column, minus SETTINGS column or None for
# the constant answer), averaged over the held-out clusters per seed.
OVERALL = {LEARNED: ("FT (no IT)", None),
           "IT then FT - constant": ("IT then FT", None), **GAINS}
# The paper's claims, sparse minus dense per seed: column -> differences
# as in OVERALL (a score minus the constant answer, which cancels between
# models, or a gain).
VERSUS_DENSE = {"FT (no IT)": OVERALL[LEARNED],
                "IT then FT": OVERALL["IT then FT - constant"],
                "IT gain on FT": GAINS["IT gain on FT"],
                "IT zero-shot": ("IT zero-shot", None),
                "IT few-shot": ("IT few-shot", None)}


def _cluster_means(rows: Sequence[dict], model: str,
                   clusters: Sequence[str],
                   baselines: Mapping[str, Mapping[str, float]],
                   differences: Mapping[str, tuple]) -> dict[str, dict]:
  """column -> {seed: the mean over `clusters` of its difference} of
  `differences` (column -> (SETTINGS column, minus column or None)) for
  `model`'s main-table rows; a seed counts where every cluster has both
  terms."""
  mine = [r for r in rows if r["model"] == model and not r["ablation"]]
  out = {}
  for column, (first, second) in differences.items():
    per_cluster = [_difference([r for r in mine if r["cluster"] == cluster],
                               first, second, baselines[cluster])
                   for cluster in clusters]
    seeds = sorted(set.intersection(*(set(d) for d in per_cluster)))
    out[column] = {s: float(np.mean([d[s] for d in per_cluster]))
                   for s in seeds}
  return out


def overall_table(rows: Sequence[dict], models: Sequence[str],
                  clusters: Sequence[str],
                  baselines: Mapping[str, Mapping[str, float]]
                  ) -> tuple[list[str], dict]:
  """Markdown lines and {model: {column: [values over seeds]}} of the
  headline numbers: per seed, the mean over `clusters` of each OVERALL
  difference. Cells: mean [95% t-interval over seeds]."""
  values = {model: {column: list(by_seed.values()) for column, by_seed in
                    _cluster_means(rows, model, clusters, baselines,
                                   OVERALL).items()}
            for model in models}
  return _gain_table(["model", *OVERALL], values), values


def versus_dense_table(rows: Sequence[dict], models: Sequence[str],
                       clusters: Sequence[str],
                       baselines: Mapping[str, Mapping[str, float]],
                       dense: str = "dense") -> tuple[list[str], dict]:
  """Markdown lines and {model: {column: [values over seeds]}}: for every
  model but `dense`, each VERSUS_DENSE score or gain (mean over `clusters`)
  minus `dense`'s of the same seed; empty without a `dense` model."""
  if dense not in models:
    return [], {}
  reference = _cluster_means(rows, dense, clusters, baselines, VERSUS_DENSE)
  values = {}
  for model in models:
    if model == dense:
      continue
    mine = _cluster_means(rows, model, clusters, baselines, VERSUS_DENSE)
    values[model] = {
        column: [v - reference[column][s] for s, v in by_seed.items()
                 if s in reference[column]]
        for column, by_seed in mine.items()}
  return _gain_table(["model minus dense", *VERSUS_DENSE], values), values


def _gain_table(header: Sequence[str], values: Mapping[str, dict]
                ) -> list[str]:
  """Markdown lines: `header`, then one row per model of `values`
  ({model: {column: [values over seeds]}}), each cell a `_gain_cell`."""
  lines = _markdown_header(header)
  for model, columns in values.items():
    lines.append(f"| {model} | " + " | ".join(
        _gain_cell(v) for v in columns.values()) + " |")
  return lines


def routing_table(rows: Sequence[dict], models: Sequence[str],
                  clusters: Sequence[str]) -> tuple[list[str], dict]:
  """Markdown lines and {model: {column: [values over seeds]}} of expert
  usage (%), drop ratio (%) and expert-load CV (std / mean of the tokens
  per expert) before (untuned) and after instruction tuning,
  each seed's value the mean over `clusters`; dense models have none."""
  stages = {"before IT": "untuned", "after IT": "instruct"}
  values = {}
  for model in models:
    mine = [r for r in rows if r["model"] == model and not r["ablation"]
            and r["cluster"] in clusters and r.get("routing")]
    if not mine:
      continue
    columns = {}
    for measure, scale in (("usage", 100), ("drop_ratio", 100),
                           ("load_cv", 1)):
      for label, stage in stages.items():
        per_seed = {}
        for r in mine:
          if r["stage"] == stage:
            per_seed.setdefault(r["seed"], []).append(
                scale * r["routing"][measure])
        columns[f"{measure} {label}"] = [float(np.mean(v))
                                         for v in per_seed.values()]
    values[model] = columns
  if not values:
    return [], values
  header = ["model", *next(iter(values.values()))]
  lines = _markdown_header(header)
  for model, columns in values.items():
    lines.append(f"| {model} | " + " | ".join(
        _cell(v, 1) for v in columns.values()) + " |")
  return lines, values


def ablation_table(rows: Sequence[dict], base: Callable[[dict], bool],
                   cluster: str) -> tuple[list[str], dict]:
  """Markdown lines and {label: {column: value}} of the one-seed ablations;
  `base` picks the rows of the model the ablations vary."""
  groups = {}
  for r in rows:
    if r["cluster"] not in ("", cluster):
      continue
    label = r["ablation"] if r["ablation"] not in ("", "base") else (
        "baseline" if base(r) else None)
    if label is not None:
      groups.setdefault(label, []).append(r)
  values = {}
  for label, mine in sorted(groups.items(), key=lambda kv: kv[0] != "baseline"):
    entry = {}
    for column, (stage, evaluation) in SETTINGS.items():
      scores = list(_score(mine, stage, evaluation).values())
      if scores:
        entry[column] = scores[0]
    if entry:
      values[label] = entry
  columns = [c for c in SETTINGS if any(c in v for v in values.values())]
  lines = _markdown_header(["ablation", *columns])
  for label, entry in values.items():
    lines.append(f"| {label} | " + " | ".join(
        f"{entry[c]:.1f}" if c in entry else "–" for c in columns) + " |")
  return lines, values


def _plot_main(values_by_cluster: dict, path: Path,
               baselines: Mapping[str, Mapping[str, float]]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  clusters = list(values_by_cluster)
  fig, axes = plt.subplots(1, len(clusters), squeeze=False,
                           figsize=(7 * len(clusters), 4))
  for ax, cluster in zip(axes[0], clusters):
    values = values_by_cluster[cluster]
    columns = list(SETTINGS) + list(GAINS)
    width = 0.8 / len(values)
    for i, (model, by_column) in enumerate(values.items()):
      means = [np.mean(by_column[c]) if by_column[c] else np.nan
               for c in columns]
      spread = [np.std(by_column[c], ddof=1) if len(by_column[c]) > 1 else 0
                for c in columns]
      ax.bar(np.arange(len(columns)) + i * width, means, width, yerr=spread,
             capsize=3, label=model)
    ax.set_xticks(np.arange(len(columns)) + 0.4 - width / 2)
    ax.set_xticklabels(columns, rotation=15)
    ax.axhline(0, color="black", linewidth=0.5)
    if cluster in baselines:
      ax.axhline(baselines[cluster]["zero_shot"], color="gray",
                 linestyle="--", linewidth=1, label="constant answer")
    ax.set_ylabel("exact match (%)")
    ax.set_title(f"held-out cluster: {cluster}")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _plot_ablations(values_by_cluster: dict, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  clusters = [c for c, v in values_by_cluster.items()
              if set(v) - {"baseline"}]
  if not clusters:
    return
  fig, axes = plt.subplots(1, len(clusters), squeeze=False,
                           figsize=(7 * len(clusters), 5))
  for ax, cluster in zip(axes[0], clusters):
    values = values_by_cluster[cluster]
    labels = list(values)
    columns = ["FT (no IT)", "IT zero-shot", "IT few-shot"]
    height = 0.8 / len(columns)
    for i, column in enumerate(columns):
      ax.barh(np.arange(len(labels)) + i * height,
              [values[label].get(column, np.nan) for label in labels], height,
              label=column)
    ax.set_yticks(np.arange(len(labels)) + 0.4 - height / 2)
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("exact match (%), one seed")
    ax.set_title(f"ablations, held-out cluster: {cluster}")
    ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(config, rows: Sequence[dict],
          wall_seconds: Optional[float] = None,
          settings: Sequence[str] = (),
          baselines: Optional[Mapping[str, Mapping[str, float]]] = None
          ) -> dict:
  """Writes the report files, with the models' table `settings` (markdown
  lines, `variants.settings_table`) and the constant-answer `baselines`
  ({cluster: {evaluation: score}}, `jobs.constant_baselines`) where given;
  returns {"main": {cluster: values}, "overall": values and
  "versus_dense": values (with `baselines`), "routing": values,
  "ablations": {cluster: values}}."""
  from experiments.variants import ModelSpec
  out = config.reports_to
  out.mkdir(parents=True, exist_ok=True)
  models = [ModelSpec(r, config.num_experts).name for r in config.routings]
  base = ModelSpec(config.ablation_base, config.num_experts).name
  is_base = lambda r: (r["model"] == base and r["seed"] ==
                       config.ablation_seed)
  lines = ["# FLAN-MoE at small scale: results", ""]
  if wall_seconds is not None:
    lines += [f"Wall time of this invocation: {wall_seconds:.0f} s "
              "(jobs whose results already existed were not rerun).", ""]
  lines += ["Exact match (%) on the held-out cluster's validation split, "
            f"{config.eval_examples} examples per task; mean ± sample std "
            f"over seeds {list(config.seeds)}; IT gain columns: differences "
            "paired by seed, mean [95% t-interval]; FT - constant: the "
            "fine-tuned score minus the constant-answer row (the score of "
            "always giving each task's most common answer), same interval. "
            "Untuned: the pre-trained model, evaluated as is. Pre-train CE: "
            "span-corruption cross entropy (nats/token) over the last 10% "
            "of steps.", ""]
  main, ablations, overall, versus = {}, {}, {}, {}
  if baselines:
    table, overall = overall_table(rows, models, config.held_out, baselines)
    lines += ["## Mean over the held-out clusters", "",
              "Per seed, the mean over the clusters "
              f"{list(config.held_out)} of each difference; mean [95% "
              "t-interval over seeds] (n seeds).", "", *table, ""]
    table, versus = versus_dense_table(rows, models, config.held_out,
                                       baselines)
    if table:
      lines += ["## Sparse minus dense (the paper's claims)", "",
                "Per seed, a sparse model's score or gain (mean over the "
                "held-out clusters) minus the dense model's of the same "
                "seed; mean [95% t-interval over seeds] (n seeds). FT "
                "(no IT) < 0: sparse models fine-tune worse without "
                "instruction tuning; IT gain on FT > 0: instruction tuning "
                "helps them more; IT zero- / few-shot > 0: instruction-tuned "
                "sparse models do better on the held-out clusters.", "",
                *table, ""]
  for cluster in config.held_out:
    table, main[cluster] = main_table(rows, models, cluster,
                                      (baselines or {}).get(cluster))
    lines += [f"## Held-out cluster: {cluster}", "", *table, ""]
    table, ablations[cluster] = ablation_table(rows, is_base, cluster)
    if set(ablations[cluster]) - {"baseline"}:  # some ablation ran
      lines += [f"### Ablations ({base}, seed {config.ablation_seed})", "",
                *table, ""]
  table, routing = routing_table(rows, models, config.held_out)
  if table:
    lines += ["## Routing before and after instruction tuning", "",
              "Expert usage (dispatched token-expert pairs / (experts x "
              "capacity), %), drop ratio (tokens no expert processed, %) "
              "and load CV (std / mean of the tokens per expert), "
              "means over sparse layers and held-out clusters, on the "
              "held-out clusters' validation examples in eval mode; mean ± "
              "sample std over seeds. Before IT: the pre-trained model.", "",
              *table, ""]
  if settings:
    lines += ["## Models (FLOP-matched to dense)", "", *settings, ""]
  (out / "table.md").write_text("\n".join(lines))
  (out / "results.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows))
  _plot_main(main, out / "main.png", baselines or {})
  _plot_ablations(ablations, out / "ablations.png")
  return {"main": main, "overall": overall, "versus_dense": versus,
          "routing": routing, "ablations": ablations}
