"""Our models against transformers (fp32, CPU) on the same tiny checkpoints (DESIGN.md §7):
max |Δlogit| <= 1e-4 and 20 greedy tokens equal, token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from models.backends import torch_kernels
from models.forward_context import prefill_context
from models.loader import load_model
from splitvl.offline import ImageInput, OfflineGenerator
from tests.reference import hf_model, hf_vl_inputs, our_prompt_logits

TOL = 1e-4
GREEDY_TOKENS = 20


def random_image(grid: tuple[int, int, int], seed: int) -> ImageInput:
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid
    return ImageInput(torch.randn(t * h * w, 3 * 2 * 16 * 16, generator=gen), grid)


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def image_part():
    return {"type": "image"}


def text_part(text: str):
    return {"type": "text", "text": text}


VL_CASES = {
    "text_only": ([{"role": "user", "content": [text_part("Tell me a story about a fox.")]}], []),
    "one_image": ([{"role": "user", "content": [image_part(), text_part("What is in this picture?")]}], [(1, 4, 6)]),
    "two_images_of_different_sizes": (
        [{"role": "user", "content": [image_part(), text_part("and"), image_part(), text_part("compare them")]}],
        [(1, 6, 4), (1, 8, 10)],
    ),
    "multi_turn_image_in_earlier_turn": (
        [
            {"role": "user", "content": [image_part(), text_part("Describe it.")]},
            {"role": "assistant", "content": [text_part("A red square on a field.")]},
            {"role": "user", "content": [text_part("What colour was the square?")]},
        ],
        [(1, 4, 4)],
    ),
}


@pytest.fixture(scope="module")
def vl(vl_ckpt):
    generator = OfflineGenerator(vl_ckpt)
    generator.eos_ids = set()  # compare a full 20 tokens; transformers is told the same below
    hf = hf_model(vl_ckpt)
    hf.generation_config.eos_token_id = None
    return generator, hf, AutoTokenizer.from_pretrained(vl_ckpt)


@pytest.mark.parametrize("case", list(VL_CASES))
def test_qwen3_vl_moe_matches_transformers(vl, case):
    generator, hf, tokenizer = vl
    messages, grids = VL_CASES[case]
    images = [random_image(g, seed=i) for i, g in enumerate(grids)]
    ids = generator.expand_image_tokens(chat_ids(tokenizer, messages), grids)
    cfg = generator.config
    assert ids.count(cfg.image_token_id) == sum(t * h * w // 4 for t, h, w in grids)

    ours = our_prompt_logits(generator.model, cfg, ids, images)
    inputs = hf_vl_inputs(ids, images, cfg.image_token_id)
    with torch.no_grad():
        ref = hf(**inputs).logits[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL

    new = generator.generate_ids(ids, images, max_tokens=GREEDY_TOKENS)
    with torch.no_grad():
        ref_ids = hf.generate(**inputs, max_new_tokens=GREEDY_TOKENS, do_sample=False)[0, len(ids) :].tolist()
    assert len(new) == GREEDY_TOKENS
    assert new == ref_ids


@pytest.mark.parametrize("fixture", ["qwen3_text_ckpt", "qwen2_text_ckpt"])
def test_text_moe_matches_transformers(request, fixture):
    ckpt = request.getfixturevalue(fixture)
    loaded = load_model(ckpt, dtype=torch.float32)
    hf = hf_model(ckpt)
    hf.generation_config.eos_token_id = None
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    prompts = [
        chat_ids(tokenizer, [{"role": "user", "content": "Write a haiku about the sea."}]),
        chat_ids(tokenizer, [{"role": "user", "content": "Hi"}]),
    ]
    # Both prompts in one flat varlen batch: each must match transformers run on it alone.
    flat = torch.tensor(prompts[0] + prompts[1])
    ctx = prefill_context(torch_kernels(), [len(p) for p in prompts])
    with torch.no_grad():
        logits = loaded.model.compute_logits(loaded.model(flat, ctx))
    for ours, ids in zip(logits.split([len(p) for p in prompts]), prompts):
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([ids])).logits[0]
        assert (ours - ref).abs().max().item() <= TOL

    generator = OfflineGenerator(ckpt)
    generator.eos_ids = set()
    new = generator.generate_ids(prompts[0], max_tokens=GREEDY_TOKENS)
    with torch.no_grad():
        ref_ids = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=GREEDY_TOKENS, do_sample=False)
    assert new == ref_ids[0, len(prompts[0]) :].tolist()
    assert len(new) == GREEDY_TOKENS


def test_greedy_is_not_trivially_repetitive(vl):
    """Guards the other tests: decisive random weights still produce varied tokens, so equal
    sequences mean something (a model stuck on one token would match anything stuck the same)."""
    generator, _, tokenizer = vl
    ids = chat_ids(tokenizer, [{"role": "user", "content": [text_part("Count to ten.")]}])
    new = generator.generate_ids(ids, max_tokens=GREEDY_TOKENS)
    assert len(set(new)) >= 4
