"""One request's state inside the engine.

Life: AWAITING_ENCODE (image jobs out at encoders) and/or AWAITING_GRAMMAR (its constraint
compiling; both may be pending at once, and the status stays AWAITING_ENCODE until the images are
back) -> WAITING (ready, not yet admitted) -> RUNNING (prefilling in chunks, then decoding) ->
FINISHED. Preemption sends a RUNNING request back to WAITING with its KV dropped; it is recomputed
from its tokens when readmitted (its grammar matcher stays: the tokens it accepted are the same).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from language_server.protocol import GenerateRequest, TokenLogprob

if TYPE_CHECKING:  # xgrammar is imported only once a request is constrained
    import xgrammar as xgr


class Status(enum.Enum):
    AWAITING_ENCODE = "awaiting_encode"
    AWAITING_GRAMMAR = "awaiting_grammar"
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class ImageState:
    # The HTTP process's content key ("" for a URL or path), replaced by the one the encoder
    # reports with the result: what the prefix cache keys the image's tokens by.
    key: str
    grid: tuple[int, int, int] | None = None
    rows: torch.Tensor | None = None  # [N, H·(1+k)] on the model's device once encoded


@dataclass
class EngineRequest:
    request: GenerateRequest
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    images: list[ImageState] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # expanded prompt, then generated tokens
    num_prompt_tokens: int = 0
    # Per-token prefix-cache identity: the token id, or (image key, index in image).
    cache_tokens: list[Hashable] = field(default_factory=list)
    positions: torch.Tensor | None = None  # [3, prompt] M-RoPE positions (VL) or None (1-D)
    rope_delta: int = 0
    image_rows: torch.Tensor | None = None  # all images' rows in prompt order
    image_mask: torch.Tensor | None = None  # [prompt] bool: prompt positions that take an image row
    image_row_start: list[int] = field(default_factory=list)  # per token: rows before it (VL)
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    num_registered_blocks: int = 0  # full blocks already offered to the prefix cache
    last_block_hash: int | None = None  # hash of the last registered block's key (the chain's parent)
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    generator: torch.Generator | None = None
    min_tokens_banned: frozenset[int] = frozenset()  # stop tokens held back until min_tokens are out
    # Structured output: the constraint's matcher, advanced by each token once its step succeeded.
    matcher: xgr.GrammarMatcher | None = None
    pending_tokens: list[int] = field(default_factory=list)  # generated, not yet sent out
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    encode_wait_s: float | None = None  # set when the last image result arrives; reported once

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def attach_image_rows(self, rows: torch.Tensor, image_token_id: int) -> None:
        """All images' encoder rows, in prompt order, for the expanded prompt in token_ids.

        Which positions take a row is fixed here, from the prompt: a generated token may be the
        image token id too (random weights emit it), and it takes no row.
        """
        self.image_mask = torch.tensor(self.token_ids[: self.num_prompt_tokens]) == image_token_id
        if int(self.image_mask.sum()) != rows.shape[0]:
            raise ValueError(f"{int(self.image_mask.sum())} image positions in the prompt but {rows.shape[0]} rows")
        self.image_rows = rows
        self.image_row_start = [0] + torch.cumsum(self.image_mask.long(), 0).tolist()

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.cache_tokens.append(token_id)
        self.pending_tokens.append(token_id)
