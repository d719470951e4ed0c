"""`splitvl generate` as a user runs it (a subprocess), both modes, against transformers'
`generate` fed by transformers' own tokenizer and image processor on the same files."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from tests.reference import hf_model

MAX_TOKENS = 20
PROMPT = "What is shown here?"


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Two images of different sizes and aspect ratios, from seeded noise over a gradient."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(96, 64), (50, 130)]):
        grad = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
        pixels = np.clip(grad * 0.5 + rng.integers(0, 128, (h, w, 3)), 0, 255).astype(np.uint8)
        path = tmp_path_factory.mktemp("img") / f"image{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def run_cli(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "splitvl", "generate", *args, "--json"], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def transformers_generate(ckpt, image_paths) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    hf = hf_model(ckpt)
    content = [{"type": "image"} for _ in image_paths] + [{"type": "text", "text": PROMPT}]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    kwargs = {}
    if image_paths:
        processor = AutoImageProcessor.from_pretrained(ckpt)
        out = processor(images=[Image.open(p).convert("RGB") for p in image_paths], return_tensors="pt")
        grids = out["image_grid_thw"]
        pad = "<|image_pad|>"
        pieces = text.split(pad)
        text = pieces[0] + "".join(pad * int(g.prod() // 4) + rest for g, rest in zip(grids, pieces[1:]))
        kwargs = {"pixel_values": out["pixel_values"], "image_grid_thw": grids}
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if image_paths:
        kwargs["mm_token_type_ids"] = (ids == hf.config.image_token_id).int()
    with torch.no_grad():
        gen = hf.generate(input_ids=ids, max_new_tokens=MAX_TOKENS, do_sample=False, **kwargs)
    return gen[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("mode", ["monolithic", "disaggregated"])
def test_generate_with_two_images_matches_transformers(vl_ckpt, image_files, mode):
    args = ["--model", str(vl_ckpt), "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS)]
    for path in image_files:
        args += ["--image", str(path)]
    if mode == "disaggregated":
        args.append("--disaggregated")
    result = run_cli(*args)
    expected = transformers_generate(vl_ckpt, image_files)
    assert result["token_ids"] == expected
    assert isinstance(result["text"], str)


def test_generate_text_only_checkpoint_matches_transformers(qwen3_text_ckpt):
    result = run_cli("--model", str(qwen3_text_ckpt), "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS))
    tokenizer = AutoTokenizer.from_pretrained(qwen3_text_ckpt)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = hf_model(qwen3_text_ckpt).generate(input_ids=ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    assert result["token_ids"] == gen[0, ids.shape[1] :].tolist()
    assert result["prompt_ids"] == ids[0].tolist()


def test_generate_reports_a_bad_model_dir_clearly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "splitvl", "generate", "--model", str(tmp_path), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "config.json not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_refuses_an_image_for_a_text_only_checkpoint(qwen3_text_ckpt, image_files):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "splitvl",
            "generate",
            "--model",
            str(qwen3_text_ckpt),
            "--prompt",
            "hi",
            "--image",
            str(image_files[0]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "text-only" in proc.stderr


def test_generate_without_a_model_runs_the_demo_checkpoint(tmp_path, image_files):
    """No --model: the tiny checkpoint `splitvl up` serves, built into the cache on first use."""
    cache = tmp_path / "cache"
    out = run_cli("--prompt", PROMPT, "--image", str(image_files[0]), "--max-tokens", "4", "--cache-dir", str(cache))
    assert len(out["token_ids"]) <= 4 and out["prompt_ids"]
    [ckpt] = cache.glob("tiny-qwen3-vl-moe-*")
    assert out == run_cli("--model", str(ckpt), "--prompt", PROMPT, "--image", str(image_files[0]), "--max-tokens", "4")
