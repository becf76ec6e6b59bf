"""Inference: greedy predictions of a trained model, written as JSONL.

Encoder-decoder models decode the targets of each input; decoder-only
(prefix-LM) models continue each input as a prompt, and the prediction is
the continuation alone.

Inputs come from a SeqIO task's split, a JSONL file (field "inputs", other
fields are copied to the output), or a text file (one input per line). Each
output line is {"inputs": ..., "prediction": ..., [other fields]}. Input and
output files may be local or remote (gs://...; `moe_jax.paths`).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import seqio

from moe_jax import paths
from moe_jax.text import encode_texts, text_lines
from moe_jax.train.evaluation import ModelFns


def read_inputs(path: str) -> list[dict[str, Any]]:
  """Records with an "inputs" string from a .jsonl file or a text file
  (UTF-8; a bad line is a ValueError naming the file and line)."""
  file = paths.as_path(path)
  if not file.is_file():
    raise ValueError(f"input file not found: {path}")
  records = []
  for number, line in text_lines(path):
    if not line.strip():
      continue
    if file.suffix == ".jsonl":
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
      if not isinstance(record, dict) or not isinstance(
          record.get("inputs"), str):
        raise ValueError(f"{path}:{number}: needs a string field 'inputs'")
      records.append(record)
    else:
      records.append({"inputs": line.rstrip("\n")})
  return records


def task_inputs(task_name: str, split: str,
                num_examples: Optional[int]) -> list[dict[str, Any]]:
  """Records from a SeqIO task's split (inputs and the reference targets)."""
  task = seqio.get_mixture_or_task(task_name)
  dataset = task.get_dataset(None, split=split, shuffle=False, num_epochs=1,
                             try_in_mem_cache=False)
  records = []
  for example in dataset.as_numpy_iterator():
    records.append({"inputs": example["inputs_pretokenized"].decode(),
                    "targets": example["targets_pretokenized"].decode()})
    if num_examples is not None and len(records) >= num_examples:
      break
  return records


def _chunks(items: list, size: int) -> Iterator[list]:
  for start in range(0, len(items), size):
    yield items[start:start + size]


def predict(fns: ModelFns, params: Any, vocabulary: seqio.Vocabulary,
            records: list[dict[str, Any]], input_length: int,
            batch_size: int, model_state: Any = None
            ) -> list[dict[str, Any]]:
  """Each record with its decoded greedy "prediction" (`model_state`:
  `TrainState.model_state`)."""
  out = []
  for chunk in _chunks(records, batch_size):
    inputs = encode_texts([r["inputs"] for r in chunk], vocabulary,
                          input_length)
    padded = np.zeros((batch_size, input_length), np.int32)
    padded[:len(chunk)] = inputs
    tokens = np.asarray(fns.predict_batch(params, fns.prompt_batch(padded),
                                              model_state))
    for record, row in zip(chunk, tokens):
      ids = row.tolist()
      if vocabulary.eos_id in ids:
        ids = ids[:ids.index(vocabulary.eos_id)]
      out.append({**record, "prediction": vocabulary.decode(ids)})
  return out


def write_jsonl(records: Iterable[dict[str, Any]], path: str) -> None:
  file = paths.as_path(path)
  file.parent.mkdir(parents=True, exist_ok=True)
  with file.open("w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
