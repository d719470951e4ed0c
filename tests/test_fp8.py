"""Qwen's block-wise FP8 checkpoints: the block arithmetic against an element-wise reference,
loading against transformers run on the dequantized weights (DESIGN.md §7), and refusals of
settings and files we cannot read right."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from models import fp8
from models.config import ConfigError
from models.loader import CheckpointError, load_model
from models.tiny_checkpoint import write_tiny_checkpoint
from splitvl.offline import OfflineGenerator
from tests.reference import hf_model, hf_vl_inputs, our_prompt_logits, write_dequantized_copy
from tests.test_model_parity import chat_ids, image_part, random_image, text_part

TOL = 1e-4
GREEDY_TOKENS = 20


def elementwise_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    w, s = weight.float().tolist(), scale_inv.float().tolist()
    return torch.tensor([[w[i][j] * s[i // 128][j // 128] for j in range(len(w[0]))] for i in range(len(w))])


def blocky_weight(rows: int, cols: int) -> torch.Tensor:
    """Random values whose magnitude differs per 128x128 block, so every block gets its own scale
    and a scale applied to the wrong block shows."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=gen)
    for i in range(0, rows, 128):
        for j in range(0, cols, 128):
            weight[i : i + 128, j : j + 128] *= 2.0 ** ((i // 128) * 3 - (j // 128) * 2)
    return weight


def test_dequantize_with_edge_blocks_matches_an_elementwise_reference():
    weight = blocky_weight(300, 200)  # 3 x 2 blocks; the last row of blocks has 44 rows, the last column 72
    q, scale = fp8.quantize(weight)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert tuple(scale.shape) == (3, 2) and len(set(scale.flatten().tolist())) == 6
    ours = fp8.dequantize(q, scale, torch.float32)
    assert torch.equal(ours, elementwise_dequantize(q, scale))
    # Qwen's dense FP8 releases store the grid in bf16: read as it is, widened to float32.
    bf16_scale = scale.to(torch.bfloat16)
    assert torch.equal(fp8.dequantize(q, bf16_scale, torch.float32), elementwise_dequantize(q, bf16_scale))
    # Rounded once from fp32 to the compute dtype.
    assert torch.equal(fp8.dequantize(q, scale, torch.bfloat16), ours.to(torch.bfloat16))


def test_quantize_scales_each_block_to_the_fp8_range():
    weight = blocky_weight(300, 200)
    q, scale = fp8.quantize(weight)
    for i in range(3):
        for j in range(2):
            block = weight[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            assert scale[i, j].item() == pytest.approx(block.abs().max().item() / 448, rel=1e-6)
            assert q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float().abs().max().item() == 448
    # e4m3 keeps 3 mantissa bits: every element within 2^-4 relative of its value, plus the
    # subnormal step of its block.
    error = (fp8.dequantize(q, scale, torch.float32) - weight).abs()
    step = fp8.dequantize(torch.ones_like(q), scale, torch.float32) * 2.0**-9
    assert (error <= weight.abs() * 2.0**-4 + step).all()


def test_dequantize_refuses_a_grid_that_does_not_fit():
    q, scale = fp8.quantize(blocky_weight(300, 200))
    with pytest.raises(ValueError, match=r"scale grid \(2, 3\) does not fit weight \(300, 200\)"):
        fp8.dequantize(q, scale.T.contiguous(), torch.float32)


# --------------------------------------------------------------------------- loading


def test_tiny_fp8_checkpoint_is_in_the_qwen_layout(fp8_vl_ckpt):
    tensors = load_file(fp8_vl_ckpt / "model.safetensors")
    config = json.loads((fp8_vl_ckpt / "config.json").read_text())
    assert config["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "modules_to_not_convert": config["quantization_config"]["modules_to_not_convert"],
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    assert "quantization_config" not in config["text_config"]
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert tensors[q].dtype == torch.float8_e4m3fn
    assert tensors[q + "_scale_inv"].dtype == torch.float32 and tensors[q + "_scale_inv"].shape == (1, 1)
    expert = "model.language_model.layers.3.mlp.experts.7.down_proj.weight"
    assert tensors[expert].dtype == torch.float8_e4m3fn and expert + "_scale_inv" in tensors
    float8 = {n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    assert not any(n.startswith("model.visual.") or "mlp.gate." in n or "norm" in n for n in float8)
    assert tensors["lm_head.weight"].dtype == tensors["model.language_model.embed_tokens.weight"].dtype == torch.float32
    assert {n + "_scale_inv" for n in float8} == {n for n in tensors if n.endswith("_scale_inv")}


@pytest.fixture(scope="module")
def fp8_vl(fp8_vl_ckpt, fp8_vl_plain):
    generator = OfflineGenerator(fp8_vl_ckpt)
    generator.eos_ids = set()
    hf = hf_model(fp8_vl_plain)
    hf.generation_config.eos_token_id = None
    return generator, hf, AutoTokenizer.from_pretrained(fp8_vl_ckpt)


@pytest.mark.parametrize("grids", [[], [(1, 4, 6)], [(1, 6, 4), (1, 8, 10)]], ids=["text", "one_image", "two_images"])
def test_fp8_vl_matches_transformers_on_the_dequantized_weights(fp8_vl, vl_ckpt, grids):
    generator, hf, tokenizer = fp8_vl
    content = [image_part() for _ in grids] + [text_part("What is in this picture?")]
    ids = generator.expand_image_tokens(chat_ids(tokenizer, [{"role": "user", "content": content}]), grids)
    images = [random_image(g, seed=i) for i, g in enumerate(grids)]
    cfg = generator.config
    ours = our_prompt_logits(generator.model, cfg, ids, images)
    inputs = hf_vl_inputs(ids, images, cfg.image_token_id)
    with torch.no_grad():
        ref = hf(**inputs).logits[0]
    assert (ours - ref).abs().max().item() <= TOL
    # The same seed unquantized gives other logits: the FP8 values, not the originals, were loaded.
    plain = load_model(vl_ckpt, dtype=torch.float32)
    assert (our_prompt_logits(plain.model, plain.config, ids, images) - ours).abs().max().item() > 1e-3

    new = generator.generate_ids(ids, images, max_tokens=GREEDY_TOKENS)
    with torch.no_grad():
        ref_ids = hf.generate(**inputs, max_new_tokens=GREEDY_TOKENS, do_sample=False)[0, len(ids) :].tolist()
    assert new == ref_ids and len(set(new)) >= 4


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe"])
def test_fp8_text_checkpoints_match_transformers(tmp_path, arch):
    """Qwen3-30B-A3B-FP8's layout; for Qwen2-MoE the shared expert is FP8 too."""
    ckpt = write_tiny_checkpoint(tmp_path / "fp8", seed=2, arch=arch, quantize_fp8=True)
    if arch == "qwen2_moe":
        shared = load_file(ckpt / "model.safetensors")["model.layers.0.mlp.shared_expert.up_proj.weight"]
        assert shared.dtype == torch.float8_e4m3fn
    loaded = load_model(ckpt, dtype=torch.float32)
    hf = hf_model(write_dequantized_copy(ckpt, tmp_path / "plain"))
    ids = chat_ids(AutoTokenizer.from_pretrained(ckpt), [{"role": "user", "content": "Write a haiku about the sea."}])
    ours = our_prompt_logits(loaded.model, loaded.config, ids)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= TOL


def test_load_logs_that_weights_were_dequantized(fp8_vl_ckpt, caplog):
    with caplog.at_level(logging.INFO, logger="models.loader"):
        load_model(fp8_vl_ckpt, part="language", dtype=torch.bfloat16)
    assert "FP8 checkpoint: 112 weights dequantized to bfloat16 at load" in caplog.text
    with caplog.at_level(logging.INFO, logger="models.loader"):
        caplog.clear()
        vision = load_model(fp8_vl_ckpt, part="vision", dtype=torch.bfloat16)
    assert "FP8" not in caplog.text  # the vision tower is not quantized
    assert {p.dtype for p in vision.model.parameters()} == {torch.bfloat16}


def test_fp8_weights_kept_fp8_give_the_dequantized_logits(fp8_vl_ckpt, caplog):
    """keep_fp8 (what an engine on a GPU loads): the attention projections and the experts stay
    FP8 with their checkpoint scale grids, in fewer bytes, and compute what the dequantized model
    does (here through the torch fallbacks; the Triton kernels have their own tests)."""
    with caplog.at_level(logging.INFO, logger="models.loader"):
        kept = load_model(fp8_vl_ckpt, part="language", dtype=torch.float32, keep_fp8=True)
    plain = load_model(fp8_vl_ckpt, part="language", dtype=torch.float32)
    assert "FP8 checkpoint: 112 weights kept FP8 with their block scales" in caplog.text
    layers = kept.config.text.num_hidden_layers
    fp8_params = [n for n, p in kept.model.named_parameters() if p.dtype == fp8.FP8_DTYPE]
    assert len(fp8_params) == layers * (4 + 2)  # q, k, v, o and the two fused expert tensors
    assert all(n.endswith(("_proj.weight", "gate_up_proj", "down_proj")) for n in fp8_params)
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    assert nbytes(kept.model) < 0.5 * nbytes(plain.model)
    ids = [5, 17, 42, 99, 3, 150, 77, 8]
    want = our_prompt_logits(plain.model, plain.config, ids)
    torch.testing.assert_close(our_prompt_logits(kept.model, kept.config, ids), want, rtol=0, atol=1e-5)


def test_fp8_q_k_v_fuse_with_their_scale_grids(tmp_path):
    """With q and k ending on 128-row block edges (4 heads x 32 and 4 KV heads x 32) the three
    FP8 projections fuse into one FP8 GEMM with one grid, and give the same logits."""
    ckpt = write_tiny_checkpoint(tmp_path, seed=9, quantize_fp8=True, text_overrides={"num_key_value_heads": 4})
    model = load_model(ckpt, part="language", dtype=torch.float32, keep_fp8=True)
    ids = [5, 17, 42, 99, 3, 150]
    unfused = our_prompt_logits(model.model, model.config, ids)
    model.model.fuse_qkv()
    attn = model.model.model.layers[0].self_attn
    assert attn.qkv_scale is not None and attn.qkv_weight.dtype == fp8.FP8_DTYPE
    assert attn.qkv_scale.shape == (3, 1)  # q, k, v: one 128-row block each, one 64-column block
    torch.testing.assert_close(our_prompt_logits(model.model, model.config, ids), unfused, rtol=0, atol=1e-6)


def test_random_fp8_models_quantize_what_the_checkpoints_do(tmp_path):
    """load_format dummy with an FP8 config and keep_fp8: the same modules as a real FP8
    checkpoint turn FP8, so a benchmark reads the bytes a served FP8 model reads."""
    from models.random_weights import random_language_model

    ckpt = write_tiny_checkpoint(tmp_path, quantize_fp8=True, metadata_only=True)
    real = write_tiny_checkpoint(tmp_path / "real", quantize_fp8=True)
    dummy = random_language_model(str(ckpt), torch.device("cpu"), torch.float32, keep_fp8=True)
    loaded = load_model(real, part="language", dtype=torch.float32, keep_fp8=True)
    fp8_names = lambda m: {n for n, p in m.named_parameters() if p.dtype == fp8.FP8_DTYPE}
    assert fp8_names(dummy.model) == fp8_names(loaded.model) != set()
    logits = our_prompt_logits(dummy.model, dummy.config, [5, 6, 7])
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_an_expert_not_stored_fp8_among_fp8_experts_is_refused_when_kept(fp8_vl_ckpt, tmp_path):
    """Experts are kept FP8 a whole layer at a time: one stored unquantized would be cast into the
    FP8 tensor with no scale, so a kept load refuses it by name (a dequantizing load reads it)."""

    def unquantize_one(tensors):
        name = next(n for n in tensors if n.endswith("mlp.experts.3.up_proj.weight"))
        tensors[name] = fp8.dequantize(tensors[name], tensors.pop(name + fp8.SCALE_SUFFIX), torch.float32)

    ckpt = copy_with(fp8_vl_ckpt, tmp_path / "mixed", quantization={}, edit=unquantize_one)
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj\.weight: not FP8, but the other experts"):
        load_model(ckpt, part="language", dtype=torch.float32, keep_fp8=True)
    load_model(ckpt, part="language", dtype=torch.float32)


# --------------------------------------------------------------------------- refusals


def copy_with(ckpt: Path, dst: Path, quantization: dict | None = None, edit=None) -> Path:
    shutil.copytree(ckpt, dst)
    config = json.loads((dst / "config.json").read_text())
    if quantization is None:
        config.pop("quantization_config")
    else:
        config["quantization_config"] = {**config["quantization_config"], **quantization}
    (dst / "config.json").write_text(json.dumps(config))
    if edit is not None:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"activation_scheme": "static"}, "activation_scheme='static' is not supported"),
        ({"weight_block_size": [64, 64]}, r"weight_block_size=\[64, 64\] is not supported"),
        ({"weight_block_size": None}, "weight_block_size=None is not supported"),
        ({"fmt": "e5m2"}, "fmt='e5m2' is not supported"),
        ({"quant_method": "compressed-tensors", "config_groups": {}}, "quant_method='compressed-tensors'"),
        ({"scale_fmt": "ue8m0"}, "scale_fmt='ue8m0' is not supported"),
        ({"kv_cache_scheme": "fp8"}, "settings splitvl does not know: kv_cache_scheme"),
    ],
)
def test_unsupported_quantization_config_is_refused(fp8_vl_ckpt, tmp_path, setting, message):
    ckpt = copy_with(fp8_vl_ckpt, tmp_path / "bad", setting)
    with pytest.raises(ConfigError, match=message):
        load_model(ckpt)


def test_the_language_service_refuses_it_at_start(fp8_vl_ckpt, tmp_path):
    ckpt = copy_with(fp8_vl_ckpt, tmp_path / "static", {"activation_scheme": "static"})
    done = subprocess.run(
        [sys.executable, "-m", "splitvl", "language", "--model", str(ckpt), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "activation_scheme='static' is not supported" in done.stderr


Q = "model.language_model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    "quantization, edit, message",
    [
        ({}, lambda t: t.pop(Q + "_scale_inv"), f"{Q} is FP8 but the checkpoint has no {Q}_scale_inv"),
        (
            {},
            lambda t: t.__setitem__(Q + "_scale_inv", torch.ones(1, 2)),
            r"needs a float32/bfloat16 scale grid of shape \(1, 1\)",
        ),
        (
            {},
            lambda t: t.__setitem__("model.language_model.layers.0.mlp.gate.weight_scale_inv", torch.ones(1, 1)),
            r"scales without a float8 weight: model\.language_model\.layers\.0\.mlp\.gate\.weight_scale_inv",
        ),
        (None, None, "config.json has no quantization_config"),
        (
            {},
            lambda t: t.__setitem__(Q, t[Q].float().to(torch.float8_e5m2)),
            "FP8 checkpoints must store torch.float8_e4m3fn",
        ),
    ],
    ids=["missing_scale", "misshaped_scale", "orphan_scale", "no_quantization_config", "e5m2_weight"],
)
def test_bad_fp8_tensors_are_refused(fp8_vl_ckpt, tmp_path, quantization, edit, message):
    ckpt = copy_with(fp8_vl_ckpt, tmp_path / "bad", quantization, edit)
    with pytest.raises(CheckpointError, match=message):
        load_model(ckpt, part="language")
