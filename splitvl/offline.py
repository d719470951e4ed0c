"""Offline greedy generation: the smoke test users run on any checkpoint (`splitvl generate`).

Monolithic mode loads the whole model. Disaggregated mode does what the two services do, in
one process: the vision tower loaded alone (part `vision`) encodes each image, the result
crosses transfer/'s codec as bytes, and the language model loaded alone (part `language`,
Qwen3MoeForCausalLMWithDeepStack) generates from the decoded rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from encode_server.images import decode_image
from encode_server.preprocess import PreprocessSettings, preprocess
from models.attention import PagedKVCache
from models.backends import torch_kernels
from models.config import load_eos_ids
from models.forward_context import ForwardContext, forward_context
from models.loader import load_model
from models.mrope import generated_positions, mrope_positions
from transfer.codec import decode_message, encode_message
from transfer.messages import EncodeResult

_BLOCK_SIZE = 16
_MAX_DECODED_PIXELS = 100_000_000


@dataclass
class ImageInput:
    pixel_values: torch.Tensor  # [P, patch_dim], the image processor's output
    grid: tuple[int, int, int]  # (t, h, w) in patches


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str


class OfflineGenerator:
    """Loads a checkpoint once; `generate_ids` runs greedy decoding with a paged KV cache."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        disaggregated: bool = False,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device = device
        self.dtype = dtype
        self.disaggregated = disaggregated
        if disaggregated:
            language = load_model(self.model_dir, part="language", device=device, dtype=dtype)
            self.config = language.config
            self.vision = (
                load_model(self.model_dir, part="vision", device=device, dtype=dtype).model
                if self.config.is_vl
                else None
            )
            self.model = language.model
        else:
            loaded = load_model(self.model_dir, part="full", device=device, dtype=dtype)
            self.model, self.config, self.vision = loaded.model, loaded.config, None
        self.eos_ids = set(load_eos_ids(self.model_dir, self.config))

    def expand_image_tokens(self, ids: Sequence[int], grids: Sequence[tuple[int, int, int]]) -> list[int]:
        """Replace each single image placeholder with the N tokens its grid merges to."""
        merge = self.config.vision.spatial_merge_size
        remaining = iter(grids)
        out: list[int] = []
        for tok in ids:
            if tok == self.config.image_token_id:
                t, h, w = next(remaining)
                out.extend([tok] * (t * h * w // merge**2))
            else:
                out.append(tok)
        return out

    @torch.no_grad()
    def generate_ids(self, ids: Sequence[int], images: Sequence[ImageInput] = (), max_tokens: int = 32) -> list[int]:
        """ids: the prompt with image placeholders already expanded. Returns the new token ids."""
        ids = list(ids)
        if images and not self.config.is_vl:
            raise ValueError(f"{self.model_dir} is a text-only checkpoint; it cannot take images")
        if self.config.is_vl:
            grids = [im.grid for im in images]
            positions, delta = mrope_positions(
                ids, grids, self.config.image_token_id, self.config.vision.spatial_merge_size
            )
        else:
            positions, delta = torch.arange(len(ids)), 0
        text = self.config.text
        num_blocks = -(-(len(ids) + max_tokens) // _BLOCK_SIZE)
        cache = PagedKVCache(
            text.num_hidden_layers,
            num_blocks,
            _BLOCK_SIZE,
            text.num_key_value_heads,
            text.head_dim,
            self.dtype,
            self.device,
        )
        kernels = torch_kernels(cache)
        block_table = torch.arange(num_blocks, device=self.device)[None, :]

        def context_for(start: int, count: int, positions: torch.Tensor) -> ForwardContext:
            slots = torch.arange(start, start + count, device=self.device)
            return forward_context(kernels, positions.to(self.device), [count], [start + count], slots, block_table)

        hidden = self._prefill(torch.tensor(ids, device=self.device), context_for(0, len(ids), positions), images)
        out: list[int] = []
        while True:
            tok = int(self.model.compute_logits(hidden[-1:]).argmax())
            out.append(tok)
            if tok in self.eos_ids or len(out) == max_tokens:
                return out
            index = len(ids) + len(out) - 1  # this token's place in the sequence
            pos = generated_positions(index, index + 1, delta) if self.config.is_vl else torch.tensor([index])
            hidden = self.model(torch.tensor([tok], device=self.device), context_for(index, 1, pos))

    def _prefill(self, ids: torch.Tensor, ctx: ForwardContext, images: Sequence[ImageInput]) -> torch.Tensor:
        if not images:
            return self.model(ids, ctx)
        if not self.disaggregated:
            pixel_values = torch.cat([im.pixel_values for im in images]).to(self.device)
            return self.model(ids, ctx, pixel_values=pixel_values, image_grid_thw=[im.grid for im in images])
        rows = self._encode_over_wire(images).to(self.device)
        return self.model(ids, replace(ctx, image_mask=ids == self.config.image_token_id, image_rows=rows))

    def _encode_over_wire(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """All images in one varlen vision forward (as the encode service batches them), then one
        EncodeResult per image through the codec as plain bytes, decoded as the language side does."""
        grids = [im.grid for im in images]
        pixel_values = torch.cat([im.pixel_values for im in images]).to(self.device)
        rows = self.vision(pixel_values, grids).cpu()
        received = []
        for i, (im, part) in enumerate(zip(images, rows.split(self.vision.tokens_per_image(grids)))):
            result = EncodeResult(request_id="offline", image_key=f"image-{i}", grid_thw=im.grid, embeddings=part)
            frames = [bytes(frame) for frame in encode_message(result)]
            received.append(decode_message(frames).embeddings)
        return torch.cat(received)


def load_image(model_dir: str | Path, path: str | Path) -> ImageInput:
    settings = PreprocessSettings.from_pretrained(model_dir)
    image = decode_image(Path(path).read_bytes(), max_pixels_decoded=_MAX_DECODED_PIXELS)
    pixel_values, grid = preprocess(image, settings)
    return ImageInput(pixel_values, tuple(grid))


def generate(
    model_dir: str | Path,
    prompt: str,
    image_paths: Sequence[str] = (),
    max_tokens: int = 32,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    disaggregated: bool = False,
) -> Generation:
    """One user message (images first, then the prompt) through the chat template, greedy."""
    from transformers import (
        AutoTokenizer,  # tokenizer and chat template only; no modeling code
    )

    generator = OfflineGenerator(model_dir, device=device, dtype=dtype, disaggregated=disaggregated)
    if image_paths and not generator.config.is_vl:
        raise ValueError(f"{model_dir} is a text-only checkpoint; it cannot take --image")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    images = [load_image(model_dir, p) for p in image_paths]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if generator.config.is_vl:
        ids = generator.expand_image_tokens(ids, [im.grid for im in images])
    new = generator.generate_ids(ids, images, max_tokens)
    return Generation(prompt_ids=ids, token_ids=new, text=tokenizer.decode(new, skip_special_tokens=True))
