"""The checkpoint loader: layouts, parts, spellings, and clear refusals of bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.loader import CheckpointError, load_model
from models.tiny_checkpoint import write_tiny_checkpoint
from tests.reference import our_prompt_logits

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


def logits_of(ckpt, part="full") -> torch.Tensor:
    loaded = load_model(ckpt, part=part, dtype=torch.float32)
    return our_prompt_logits(loaded.model, loaded.config, PROMPT)


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(ckpt: Path, edit) -> None:
    """Rewrite a single-file checkpoint's tensors through `edit(dict) -> None`."""
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("layout", ["transformers", "per_expert"])
def test_expert_layouts_load_to_the_same_logits(vl_ckpt, tmp_path, layout):
    other = write_tiny_checkpoint(tmp_path / layout, seed=0, expert_layout=layout)
    keys = load_file(other / "model.safetensors").keys()
    if layout == "per_expert":
        assert any(".mlp.experts.0.gate_proj.weight" in k for k in keys)
    assert torch.equal(logits_of(vl_ckpt), logits_of(other))


def test_transformers_config_spelling_and_sharding_load_the_same(vl_ckpt, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "tf", seed=0, config_spelling="transformers", max_shard_bytes=200_000)
    assert (other / "model.safetensors.index.json").is_file()
    assert "num_local_experts" in json.loads((other / "config.json").read_text())["text_config"]
    assert torch.equal(logits_of(vl_ckpt), logits_of(other))


def test_tied_embeddings(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "tied", seed=4, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(ckpt / "model.safetensors")
    model = load_model(ckpt, dtype=torch.float32).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_parts_read_only_their_own_tensors(vl_ckpt):
    language = load_model(vl_ckpt, part="language")
    vision = load_model(vl_ckpt, part="vision")
    full = load_model(vl_ckpt, part="full")
    assert language.tensors_read and not any(n.startswith("model.visual.") for n in language.tensors_read)
    assert vision.tensors_read and all(n.startswith("model.visual.") for n in vision.tensors_read)
    assert sorted(full.tensors_read) == sorted(language.tensors_read + vision.tensors_read)
    # The language part of a VL checkpoint gives the monolithic model's text-only logits.
    assert torch.equal(logits_of(vl_ckpt, "language"), logits_of(vl_ckpt, "full"))


def test_weights_land_in_the_requested_dtype(vl_ckpt):
    model = load_model(vl_ckpt, part="vision", dtype=torch.bfloat16).model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_pickle_only_directory_is_refused(vl_ckpt, tmp_path):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    shutil.copy(vl_ckpt / "config.json", ckpt / "config.json")
    torch.save({"x": torch.zeros(1)}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_model(ckpt)


def test_missing_tensor_is_named(vl_ckpt, tmp_path):
    ckpt = copy_ckpt(vl_ckpt, tmp_path / "missing")
    edit_tensors(ckpt, lambda t: t.pop("model.language_model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_norm\.weight"):
        load_model(ckpt)


def test_unexpected_tensor_is_named(vl_ckpt, tmp_path):
    ckpt = copy_ckpt(vl_ckpt, tmp_path / "unexpected")
    edit_tensors(ckpt, lambda t: t.__setitem__("model.language_model.layers.0.mlp.bonus.weight", torch.ones(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*layers\.0\.mlp\.bonus\.weight"):
        load_model(ckpt)
    # ... also when it sits outside every known prefix.
    edit_tensors(
        ckpt,
        lambda t: (
            t.pop("model.language_model.layers.0.mlp.bonus.weight"),
            t.__setitem__("encoder.stray", torch.ones(2)),
        ),
    )
    with pytest.raises(CheckpointError, match="encoder.stray"):
        load_model(ckpt, part="language")


def test_misshaped_tensor_is_named(vl_ckpt, tmp_path):
    ckpt = copy_ckpt(vl_ckpt, tmp_path / "misshaped")
    name = "model.visual.blocks.0.attn.qkv.weight"
    edit_tensors(ckpt, lambda t: t.__setitem__(name, torch.ones(3, 3)))
    with pytest.raises(CheckpointError, match=r"mis-shaped tensors: model\.visual\.blocks\.0\.attn\.qkv\.weight"):
        load_model(ckpt, part="vision")


def test_ambiguous_square_expert_shape_is_refused(vl_ckpt, tmp_path):
    """With 2I == H the fused gate_up tensor reads the same in both layouts: refuse, don't guess."""
    ckpt = copy_ckpt(vl_ckpt, tmp_path / "square")
    config = json.loads((ckpt / "config.json").read_text())
    text = config["text_config"]
    hidden, experts = text["hidden_size"], text["num_experts"]
    text["moe_intermediate_size"] = hidden // 2
    (ckpt / "config.json").write_text(json.dumps(config))

    def square(t):
        for name in list(t):
            if name.endswith("experts.gate_up_proj"):
                t[name] = torch.randn(experts, hidden, hidden)
            elif name.endswith("experts.down_proj"):
                t[name] = torch.randn(experts, hidden // 2, hidden)

    edit_tensors(ckpt, square)
    with pytest.raises(CheckpointError, match="refuses to guess"):
        load_model(ckpt, part="language")


def test_missing_shard_is_named(vl_ckpt, tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "sharded", seed=0, max_shard_bytes=200_000)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (ckpt / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        load_model(ckpt)


def test_vision_part_of_a_text_checkpoint_is_refused(qwen3_text_ckpt):
    with pytest.raises(CheckpointError, match="no vision tower"):
        load_model(qwen3_text_ckpt, part="vision")
