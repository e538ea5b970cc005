"""Train a small byte-level BPE tokenizer on a JSONL corpus and save it as a Hugging Face folder.

    python scripts/train_quickstart_tokenizer.py --input corpus.jsonl --output tokenizer_dir [--vocab-size 4096]

Writes tokenizer.json (the `tokenizers` model) and tokenizer_config.json (eos/bos
`<|endoftext|>`), which `--tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer_dir`
loads through transformers' AutoTokenizer. Needs only the `tokenizers` package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator

EOS = "<|endoftext|>"


def texts(path: str, key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield json.loads(line)[key]


def train(input_path: str, output_dir: str, vocab_size: int, key: str = "text") -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(input_path, key), trainer=trainer)
    os.makedirs(output_dir, exist_ok=True)
    tok.save(os.path.join(output_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "bos_token": EOS,
        "unk_token": EOS,
        "model_max_length": 1_000_000,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(output_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(output_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": EOS, "bos_token": EOS, "unk_token": EOS}, f, indent=2)
    return tok.get_vocab_size()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="JSONL corpus")
    p.add_argument("--output", required=True, help="tokenizer folder to write")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--json-key", default="text")
    args = p.parse_args(argv)
    n = train(args.input, args.output, args.vocab_size, args.json_key)
    print(f"wrote {args.output}: byte-level BPE, {n} tokens, eos {EOS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
