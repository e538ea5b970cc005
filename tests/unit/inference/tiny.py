"""Tiny models and a tiny tokenizer for the generation tests, all built locally.

`converted` turns a random HF model of `tests.unit.core.models.hf_tiny` into ours through the
real converter; `with_mtp` adds MTP depths to a config; `train_successor_model` fits a tiny model
with MTP depths to a deterministic successor rule on the lower half of the vocabulary, so its
drafts are often, but not always, right; `save_word_tokenizer` writes a word-level HF tokenizer
directory smaller than the tiny models' vocabulary (the rest of the embedding is padding).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Tuple

import torch
from torch import nn

from megatron.core.config import DeepSeekConfig, MTPConfig
from megatron.core.models.deepseek import (
    DeepSeekModel,
    config_from_hf,
    load_hf_checkpoint,
)
from tests.unit.core.models.hf_tiny import build_hf

WORDS = (
    "the a one two cat dog bird fish runs sleeps eats sings jumps sits big small red blue green old new "
    "happy sad fast slow and or but then here there now later in on under over with without house tree "
    "river hill road city day night sun moon rain snow wind fire water stone"
).split()
SPECIALS = ["<s>", "</s>", "<unk>"]


def converted(name: str, directory: Path, **overrides) -> Tuple[nn.Module, nn.Module, DeepSeekConfig]:
    """(HF model, our model loaded from its save_pretrained directory, our config), both eval."""
    hf = build_hf(name, **overrides)
    hf.save_pretrained(str(directory))
    ours, config = load_hf_checkpoint(str(directory))
    return hf, ours.eval(), config


def with_mtp(name: str, depths: int, seed: int = 0) -> DeepSeekModel:
    """Random model of hf_tiny's `name` architecture with `depths` MTP depths."""
    config = config_from_hf(build_hf(name).config)
    config = dataclasses.replace(config, mtp=MTPConfig(num_layers=depths, loss_scaling_factor=1.0))
    torch.manual_seed(seed)
    return DeepSeekModel(config).eval()


def successor_rule(vocab: int, seed: int = 0) -> torch.Tensor:
    """A permutation of the lower half of the vocabulary, [vocab // 2] int64."""
    return torch.randperm(vocab // 2, generator=torch.Generator().manual_seed(seed))


def train_successor_model(depths: int = 2, steps: int = 30, seed: int = 0) -> Tuple[DeepSeekModel, torch.Tensor]:
    """A tiny V3 model with MTP trained on sequences t_{i+1} = rule[t_i] over the lower half of the
    vocabulary (the upper half is never seen). Returns (model in eval mode, rule)."""
    model = with_mtp("v3", depths, seed).train()
    rule = successor_rule(model.config.vocab_size, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        seq = torch.empty(16, 33, dtype=torch.long)
        seq[:, 0] = torch.randint(0, rule.numel(), (16,), generator=gen)
        for i in range(1, seq.shape[1]):
            seq[:, i] = rule[seq[:, i - 1]]
        out = model(seq[:, :-1], labels=seq[:, 1:])
        loss = model.loss(out, torch.ones(16, 32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), rule


def save_word_tokenizer(directory: Path) -> Path:
    """Word-level HF tokenizer (<s> prepended, </s> = eos) with len(WORDS) + 3 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        str(directory)
    )
    return directory


def uncached_last_logits(model: nn.Module, tokens: List[int]) -> torch.Tensor:
    """The training forward over the whole sequence, no cache: fp32 logits [V] of its last position."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1].float()
