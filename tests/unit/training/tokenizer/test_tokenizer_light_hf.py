"""HuggingFaceTokenizer without transformers: a generic tokenizer.json directory is loaded with
`tokenizers` alone (no torch import, ~0.02 s instead of seconds) and gives AutoTokenizer's ids;
anything with class-specific behaviour still goes through transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from megatron.training.tokenizer import HuggingFaceTokenizer
from megatron.training.tokenizer.huggingface import load_plain_fast_tokenizer
from tests.unit.training.tokenizer.test_tokenizer_hf_gpt2 import TEXTS, _auto


def test_generic_directory_loads_without_transformers_and_matches(hf_dir, golden_dir, sentences):
    for path in (hf_dir, golden_dir / "input" / "tokenizer"):
        tok = HuggingFaceTokenizer(path)
        assert tok._tokenizer is None, f"{path} was loaded through transformers"
        auto = _auto(path)
        texts = TEXTS + sentences[:30] + ["<|endoftext|> in text", "</s><s>"]
        assert [tok.tokenize(t) for t in texts] == [auto(t).input_ids for t in texts]
        assert tok.tokenize_batch(texts) == [auto(t).input_ids for t in texts]
        assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (len(auto), auto.eos_token_id, auto.bos_token_id,
                                                               auto.pad_token_id)
        assert tok.vocab == auto.get_vocab()
        assert tok.detokenize(tok.tokenize("the model")) == auto.decode(auto("the model").input_ids)


def test_class_specific_or_extra_settings_fall_back_to_transformers(hf_dir, tmp_path):
    for name, change in (("llama", {"tokenizer_class": "LlamaTokenizerFast"}), ("bos", {"add_bos_token": True}),
                         ("unknown_eos", {"eos_token": "<never-seen>"})):
        folder = tmp_path / name
        shutil.copytree(hf_dir, folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.update(change)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        assert load_plain_fast_tokenizer(str(folder)) is None, name


def test_hf_preprocessing_imports_neither_torch_nor_transformers(golden_dir, tmp_path, repo_root):
    probe = (
        "import runpy, sys; sys.argv = sys.argv[1:]\n"
        "code = 0\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, f'imported {heavy}'\n"
        "sys.exit(code)"
    )
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} of the corpus"}) + "\n" for i in range(50)))
    cmd = [sys.executable, "-c", probe, "tools/preprocess_data.py", "--input", str(corpus), "--output-prefix",
           str(tmp_path / "out"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
           str(golden_dir / "input" / "tokenizer"), "--append-eod", "--workers", "2"]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "done: 50 documents" in proc.stderr
