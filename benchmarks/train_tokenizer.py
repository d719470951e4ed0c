"""Train a byte-level BPE tokenizer of Qwen's size offline, for benchmarks with random weights.

    python benchmarks/train_tokenizer.py OUT.json       # ~1 min on 16 cores

There is no model hub here, and with the tiny tokenizer (448 ids) most of a random model's
151,936 ids have no text, so streams arrive in bursts and grammar masks are tiny. This trains
151,643 byte-level BPE tokens (Qwen2's base vocabulary size) on the Python sources installed
next to this interpreter; `model_gpu.wide_tokenizer` then adds Qwen's special tokens at their ids.
"""

from __future__ import annotations

import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

QWEN_BASE_VOCAB = 151_643


def sources(limit_bytes: int = 400 << 20) -> Iterator[str]:
    seen = 0
    for path in sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py")):
        try:
            text = path.read_text(errors="ignore")
        except OSError:
            continue
        seen += len(text)
        if seen > limit_bytes:
            return
        yield text


def main() -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=QWEN_BASE_VOCAB,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(sources(), trainer=trainer)
    tok.save(sys.argv[1])
    print(f"wrote {sys.argv[1]}: {tok.get_vocab_size()} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
