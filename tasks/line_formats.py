"""One line of a text data file to its string fields: JSONL or TSV.

A format is named by the file's extension. `parse(path)` gives the parser
of a file; a parser maps (line text, fields, where) to {field: str} and
raises ValueError prefixed with `where` (e.g. "<file>:<line>") when the
line is malformed: not a JSON object, a field missing, or not exactly one
tab-separated column per field. Blank lines hold no example (`is_blank`).
"""

import json
from typing import Callable, Dict, Sequence

Record = Dict[str, str]
Parser = Callable[[str, Sequence[str], str], Record]


def parse_jsonl(line: str, fields: Sequence[str], where: str) -> Record:
  """{field: str(value)} of a JSON object holding every field."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object")
  missing = [k for k in fields if k not in record]
  if missing:
    raise ValueError(f"{where}: missing field(s) {missing}")
  return {k: str(record[k]) for k in fields}


def parse_tsv(line: str, fields: Sequence[str], where: str) -> Record:
  """{field: column} of exactly len(fields) tab-separated columns."""
  cols = line.rstrip("\r\n").split("\t")
  if len(cols) != len(fields):
    raise ValueError(f"{where}: expected {len(fields)} tab-separated columns "
                     f"{list(fields)}, got {len(cols)}")
  return dict(zip(fields, cols))


PARSERS: Dict[str, Parser] = {"jsonl": parse_jsonl, "tsv": parse_tsv}


def extension(path: str) -> str:
  return path.rsplit(".", 1)[-1]


def parse(path: str) -> Parser:
  """The parser of `path`'s format; ValueError for another extension."""
  ext = extension(path)
  if ext not in PARSERS:
    raise ValueError(f"{path}: unknown line format {ext!r}; expected a file "
                     f"ending in one of {sorted('.' + e for e in PARSERS)}")
  return PARSERS[ext]


def is_blank(line: str) -> bool:
  return not line.strip()
