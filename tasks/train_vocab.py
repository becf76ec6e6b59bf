"""Trains a SentencePiece vocabulary with T5 conventions from text files.

  python -m tasks.train_vocab --output /path/spm --vocab_size 8000 a.txt b.txt

Writes /path/spm.model and /path/spm.vocab: unigram model, pad 0, eos 1,
unk 2, no bos; the extra ids (sentinels) are appended by
`seqio.SentencePieceVocabulary(path, extra_ids=N)` when loaded (see
tasks.vocab.make_vocabulary).
"""

import argparse
from typing import Sequence

import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def train(inputs: Sequence[str], output_prefix: str, vocab_size: int,
          model_type: str = "unigram", character_coverage: float = 1.0
          ) -> str:
  """Trains on the lines of `inputs`; returns the .model path."""
  if vocab_size < 4:
    raise ValueError(f"vocab_size: {vocab_size} < 4")
  if not inputs:
    raise ValueError("inputs: at least one text file is required")
  spm.SentencePieceTrainer.train(
      input=",".join(inputs), model_prefix=output_prefix,
      vocab_size=vocab_size, model_type=model_type,
      character_coverage=character_coverage, pad_id=PAD_ID, eos_id=EOS_ID,
      unk_id=UNK_ID, bos_id=-1, hard_vocab_limit=False,
      minloglevel=2)
  return output_prefix + ".model"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("inputs", nargs="+", help="plain-text files, one "
                      "sentence or document per line")
  parser.add_argument("--output", required=True, help="output prefix")
  parser.add_argument("--vocab_size", type=int, default=32000)
  parser.add_argument("--model_type", default="unigram",
                      choices=("unigram", "bpe"))
  args = parser.parse_args(argv)
  print(train(args.inputs, args.output, args.vocab_size, args.model_type))


if __name__ == "__main__":
  main()
