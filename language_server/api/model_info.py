"""What the HTTP process knows about the served checkpoint: its name, tokenizer and a few ids.

It never loads weights; the engine process does that.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from language_server.settings import LanguageSettings
from models.config import load_config

logger = logging.getLogger("splitvl.api")


@dataclass
class ServedModel:
    name: str
    tokenizer: PreTrainedTokenizerBase
    vocab_size: int  # the model's (may exceed the tokenizer's: padded embedding rows)
    is_vl: bool
    image_token_id: int | None
    image_token: str | None  # its text, e.g. "<|image_pad|>"
    # The most characters one token can stand for; bounds a text's token count from below.
    max_token_chars: int
    # generation_config.json's sampling values: the defaults for parameters a request leaves out,
    # as in transformers' generate and vLLM (Qwen ships e.g. temperature 0.7, top_p 0.8, top_k 20).
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    # Whether answers may open with <think>…</think>, split out as reasoning_content.
    reasoning: bool = False

    @classmethod
    def load(cls, settings: LanguageSettings) -> ServedModel:
        config = load_config(settings.model)
        tokenizer = AutoTokenizer.from_pretrained(settings.model)
        image_token = tokenizer.convert_ids_to_tokens(config.image_token_id) if config.is_vl else None
        return cls(
            name=settings.served_model_name or Path(settings.model).resolve().name,
            tokenizer=tokenizer,
            vocab_size=config.text.vocab_size,
            is_vl=config.is_vl,
            image_token_id=config.image_token_id if config.is_vl else None,
            image_token=image_token,
            max_token_chars=_max_token_chars(tokenizer),
            sampling_defaults=_sampling_defaults(Path(settings.model)),
            reasoning=_reasoning(settings.reasoning_parser, tokenizer),
        )


def _reasoning(setting: str, tokenizer: PreTrainedTokenizerBase) -> bool:
    """qwen3 or none as set; auto: on when the chat template writes a think block, as Qwen3's
    thinking templates do (Qwen3-VL-Instruct's does not)."""
    if setting != "auto":
        return setting == "qwen3"
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    thinks = "<think>" in template
    logger.info(
        "reasoning parser: %s (the chat template %s think blocks; set reasoning_parser to choose)",
        "qwen3" if thinks else "none",
        "writes" if thinks else "has no",
    )
    return thinks


def _max_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """Byte-level BPE spells each byte as one character, so an ordinary token's length is the
    bytes it covers; added tokens (<|im_start|>, ...) are matched as their text."""
    ordinary = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    added = (t.content for t in tokenizer.added_tokens_decoder.values())
    return max(max(map(len, ordinary), default=1), max((len(a.encode()) for a in added), default=1))


_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _sampling_defaults(model_dir: Path) -> dict[str, float]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return {k: config[k] for k in _SAMPLING_KEYS if isinstance(config.get(k), (int, float))}
