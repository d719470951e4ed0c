"""A cheap refusal of texts that cannot fit the context, before any tokenizing.

Tokenizing is linear but not cheap (a 10 MB message takes tens of seconds on one core), so a
text that is certainly too long is refused from its length alone. Every token covers at most
`max_token_chars` characters of normalized text, and NFC normalization at most triples a text
(Unicode's bound), so a text of more than 3 · max_token_chars · max_model_len characters has
more than max_model_len tokens. The bound never refuses a prompt that fits; texts under it are
tokenized (off the event loop) and checked exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

from language_server.api.errors import bad_request
from language_server.api.model_info import ServedModel

_NFC_EXPANSION = 3


def refuse_oversized_text(texts: Iterable[str], model: ServedModel, max_model_len: int, param: str) -> None:
    limit = _NFC_EXPANSION * model.max_token_chars * max_model_len
    total = sum(len(t) for t in texts)
    if total > limit:
        raise bad_request(
            f"The {param} text is {total} characters, more than the {max_model_len}-token context "
            f"of this model can hold whatever the tokenization (at most {model.max_token_chars} "
            "characters a token). Shorten it.",
            param=param,
            code="context_length_exceeded",
        )
