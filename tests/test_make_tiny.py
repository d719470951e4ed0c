"""`splitvl make-tiny`: random checkpoints that transformers loads exactly, with a working
tokenizer and processor, and weights that make MoE bugs visible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from models import tiny_tokenizer
from models.tiny_checkpoint import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
CAUSAL_LM = {
    "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration,
    "qwen3_moe": transformers.Qwen3MoeForCausalLM,
    "qwen2_moe": transformers.Qwen2MoeForCausalLM,
}


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("vl"), seed=0)


def text_prefix(arch: str) -> str:
    return "model.language_model." if arch == "qwen3_vl_moe" else "model."


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(directory / file))
    return tensors


def load_in_transformers(directory: Path, arch: str):
    model, info = CAUSAL_LM[arch].from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, errors
    return model.eval()


def stored_expert(file: dict, prefix: str, layout: str, j: int) -> tuple[torch.Tensor, ...]:
    """Expert j's (gate [I, H], up [I, H], down [H, I]) read from the file in its own layout."""
    if layout == "per_expert":
        return tuple(file[f"{prefix}{j}.{p}_proj.weight"] for p in ("gate", "up", "down"))
    gate_up, down = file[prefix + "gate_up_proj"][j], file[prefix + "down_proj"][j]
    if layout == "hub":  # [H, 2I] and [I, H]
        gate_up, down = gate_up.T, down.T
    half = gate_up.shape[0] // 2
    return gate_up[:half], gate_up[half:], down


@pytest.mark.parametrize(
    "arch, layout, spelling, tie",
    [
        ("qwen3_vl_moe", "hub", "hub", False),
        ("qwen3_vl_moe", "transformers", "transformers", True),
        ("qwen3_moe", "per_expert", "hub", False),
        ("qwen3_moe", "transformers", "transformers", True),
        ("qwen2_moe", "per_expert", "hub", False),
        ("qwen2_moe", "per_expert", "transformers", True),
    ],
)
def test_transformers_loads_exactly_the_file(tmp_path, arch, layout, spelling, tie):
    directory = write_tiny_checkpoint(
        tmp_path, seed=5, arch=arch, expert_layout=layout, config_spelling=spelling, tie_word_embeddings=tie
    )
    model = load_in_transformers(directory, arch)
    state, file = model.state_dict(), read_weights(directory)
    prefix = text_prefix(arch)
    # Every tensor but the experts arrives unchanged.
    for name, tensor in file.items():
        if ".mlp.experts." not in name:
            assert torch.equal(state[name], tensor), name
    # Experts: transformers holds [E, 2I, H] (gate rows first) and [E, H, I]; compare by value so
    # a wrong transpose of the hub layout cannot pass on shape alone.
    config = model.config.get_text_config()
    H, I = config.hidden_size, config.moe_intermediate_size
    assert 2 * I != H and I != H, "fused expert layouts would be ambiguous by shape"
    for layer in range(config.num_hidden_layers):
        experts = f"{prefix}layers.{layer}.mlp.experts."
        for j in (0, config.num_experts - 1):
            gate, up, down = stored_expert(file, experts, layout, j)
            assert torch.equal(state[experts + "gate_up_proj"][j], torch.cat([gate, up]))
            assert torch.equal(state[experts + "down_proj"][j], down)
    if tie:
        assert "lm_head.weight" not in file
        assert torch.equal(model.lm_head.weight, file[prefix + "embed_tokens.weight"])
    else:
        assert not torch.equal(model.lm_head.weight[:8, :8], file[prefix + "embed_tokens.weight"][:8, :8])
    if arch == "qwen2_moe":
        assert prefix + "layers.0.mlp.shared_expert_gate.weight" in file
        assert prefix + "layers.0.self_attn.q_proj.bias" in file
        assert not any("q_norm" in name for name in file)
        assert model.config.norm_topk_prob is False


def test_expert_layouts_hold_the_same_model(vl_dir, tmp_path):
    """The three layouts only rearrange one set of expert weights (transformers checks the
    hub file; the other two files must hold the very same numbers)."""
    hub = load_in_transformers(vl_dir, "qwen3_vl_moe").state_dict()
    for layout in ("transformers", "per_expert"):
        file = read_weights(write_tiny_checkpoint(tmp_path / layout, seed=0, expert_layout=layout))
        for layer in range(4):
            prefix = f"model.language_model.layers.{layer}.mlp.experts."
            for j in range(8):
                gate, up, down = stored_expert(file, prefix, layout, j)
                assert torch.equal(torch.cat([gate, up]), hub[prefix + "gate_up_proj"][j]), (layout, layer, j)
                assert torch.equal(down, hub[prefix + "down_proj"][j]), (layout, layer, j)
    text = [
        load_in_transformers(
            write_tiny_checkpoint(tmp_path / f"text-{layout}", arch="qwen3_moe", expert_layout=layout), "qwen3_moe"
        ).state_dict()
        for layout in ("per_expert", "transformers")
    ]
    assert text[0].keys() == text[1].keys() and all(torch.equal(text[0][k], text[1][k]) for k in text[0])


def test_hub_and_transformers_config_spellings(vl_dir, tmp_path):
    hub = json.loads((vl_dir / "config.json").read_text())
    text = hub["text_config"]
    assert {"num_experts", "rope_theta", "rope_scaling", "norm_topk_prob"} <= text.keys() and "torch_dtype" in hub
    assert text["rope_scaling"] == {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True}
    assert hub["architectures"] == ["Qwen3VLMoeForConditionalGeneration"] and hub["tie_word_embeddings"] is False
    for arch in ("qwen3_vl_moe", "qwen3_moe", "qwen2_moe"):
        hub_dir = write_tiny_checkpoint(tmp_path / f"hub-{arch}", arch=arch, metadata_only=True)
        tf_dir = write_tiny_checkpoint(
            tmp_path / f"tf-{arch}", arch=arch, config_spelling="transformers", metadata_only=True
        )
        written = json.loads((tf_dir / "config.json").read_text())
        resaved = tmp_path / f"resaved-{arch}"
        transformers.AutoConfig.from_pretrained(hub_dir).save_pretrained(resaved)
        saved = json.loads((resaved / "config.json").read_text())
        if arch == "qwen3_vl_moe":
            written, saved = written["text_config"], saved["text_config"]
        assert written.keys() <= saved.keys(), written.keys() - saved.keys()
        assert "rope_parameters" in written and "dtype" in written and "rope_theta" not in written
        experts_key = "num_experts" if arch == "qwen2_moe" else "num_local_experts"  # as transformers writes
        assert written[experts_key] == saved[experts_key] == 8
        a, b = (transformers.AutoConfig.from_pretrained(d).get_text_config() for d in (hub_dir, tf_dir))
        assert (a.rope_parameters, a.num_experts, a.dtype) == (b.rope_parameters, b.num_experts, b.dtype)


def test_tokenizer_round_trips_and_knows_the_special_tokens(vl_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(vl_dir)
    config = json.loads((vl_dir / "config.json").read_text())
    for text in ("Hello world! The picture shows 2 cats.", "naïve café 你好 🙂\n\ttabs  and  spaces", ""):
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (
        len(tokenizer.encode("The picture shows the image")) < len("The picture shows the image") / 2
    )  # merges learned
    for token, key in [
        ("<|image_pad|>", "image_token_id"),
        ("<|video_pad|>", "video_token_id"),
        ("<|vision_start|>", "vision_start_token_id"),
        ("<|vision_end|>", "vision_end_token_id"),
    ]:
        assert tokenizer.encode(token) == [config[key]]
    for token in tiny_tokenizer.SPECIAL_TOKENS:
        assert len(tokenizer.encode(token)) == 1, token
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert config["text_config"]["eos_token_id"] == tokenizer.eos_token_id
    generation = json.loads((vl_dir / "generation_config.json").read_text())
    assert tokenizer.eos_token_id in generation["eos_token_id"] and "do_sample" not in generation
    vocab = config["text_config"]["vocab_size"]
    assert vocab % 64 == 0 and len(tokenizer) <= vocab < len(tokenizer) + 64


def test_chat_template_renders_images_and_turns(vl_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(vl_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "And this?"},
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
            ],
        },
        {"role": "assistant", "content": "Two cats."},
        {"role": "user", "content": "Thanks"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{image}And this?{image}<|im_end|>\n"
        "<|im_start|>assistant\nTwo cats.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages[:2], tokenize=True, return_dict=False)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 2
    assert not tokenizer.apply_chat_template(messages[:2], tokenize=False).endswith("<|im_start|>assistant\n")


def test_image_processor_loads_without_torchvision(vl_dir):
    from PIL import Image

    processor = transformers.AutoImageProcessor.from_pretrained(vl_dir)
    config = json.loads((vl_dir / "preprocessor_config.json").read_text())
    assert (config["patch_size"], config["temporal_patch_size"], config["merge_size"]) == (16, 2, 2)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8))
    out = processor(images=[image], return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    assert (t, h % 2, w % 2) == (1, 0, 0) and out["pixel_values"].shape == (t * h * w, 3 * 2 * 16 * 16)
    big = processor(images=[image.resize((1500, 1000))], return_tensors="pt")["image_grid_thw"][0]
    assert big.prod() * 16 * 16 <= config["size"]["longest_edge"]  # tiny pixel limits keep images small


def test_same_seed_same_bytes_other_seed_other_weights(vl_dir, tmp_path):
    again = write_tiny_checkpoint(tmp_path / "again", seed=0)
    names = sorted(p.name for p in vl_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (vl_dir / name).read_bytes() == (again / name).read_bytes(), name
    other = read_weights(write_tiny_checkpoint(tmp_path / "other", seed=1))
    same = read_weights(vl_dir)
    assert other.keys() == same.keys()
    assert not any(torch.equal(other[k], same[k]) for k in same)


def test_routing_is_decisive_and_activations_stay_unit_scale(vl_dir, tmp_path):
    for arch, directory in [("qwen3_vl_moe", vl_dir), ("qwen2_moe", write_tiny_checkpoint(tmp_path, arch="qwen2_moe"))]:
        model = load_in_transformers(directory, arch)
        ids = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True, output_router_logits=True)
        for hidden in out.hidden_states:
            assert 0.7 < hidden.pow(2).mean().sqrt() < 2.5
        for router_logits in out.router_logits:
            top = router_logits.softmax(-1).topk(2, dim=-1).values
            assert (top[:, 0] - top[:, 1]).mean() > 0.3  # HF's default init gives ~0.02
            assert router_logits.argmax(-1).unique().numel() >= 6  # decisive, yet all experts used
        top = out.logits.topk(2, dim=-1).values
        assert (top[..., 0] - top[..., 1]).median() > 0.7
    # The vision tower's image embedding and deepstack features are unit-scale too.
    model = load_in_transformers(vl_dir, "qwen3_vl_moe")
    pixels = torch.randn(1 * 8 * 8, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    with torch.no_grad():
        vision = model.model.visual(pixels, grid_thw=torch.tensor([[1, 8, 8]]), return_dict=True)
    for features in (vision.pooler_output, *vision.deepstack_features):
        assert features.shape == (16, 64) and 0.5 < features.pow(2).mean().sqrt() < 2.0


def test_deepstack_levels_follow_the_argument(tmp_path):
    directory = write_tiny_checkpoint(tmp_path, seed=1, deepstack_visual_indexes=[0, 3])
    assert json.loads((directory / "config.json").read_text())["vision_config"]["deepstack_visual_indexes"] == [0, 3]
    names = read_weights(directory).keys()
    assert {n.split(".")[3] for n in names if "deepstack_merger_list" in n} == {"0", "1"}
    assert len(load_in_transformers(directory, "qwen3_vl_moe").model.visual.deepstack_merger_list) == 2
    with pytest.raises(ValueError, match="outside the vision blocks"):
        write_tiny_checkpoint(tmp_path / "bad", deepstack_visual_indexes=[5])


def test_sharded_tiny_checkpoint(tmp_path):
    directory = write_tiny_checkpoint(tmp_path, seed=0, max_shard_bytes=300_000)
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    assert len(files) > 2 and files[-1] == f"model-{len(files):05d}-of-{len(files):05d}.safetensors"
    assert not (directory / "model.safetensors").exists()
    for file in files:
        with safe_open(directory / file, "pt") as f:
            assert set(f.keys()) == {n for n, v in weight_map.items() if v == file}
    load_in_transformers(directory, "qwen3_vl_moe")


def test_dtype_and_layer_count_keep_the_values(vl_dir, tmp_path):
    reference = read_weights(vl_dir)
    bf16 = read_weights(write_tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert bf16.keys() == reference.keys()
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], reference[k].to(torch.bfloat16)) for k in bf16)
    short = read_weights(write_tiny_checkpoint(tmp_path / "short", num_layers=2))
    assert not any(".layers.2." in k for k in short)
    assert all(torch.equal(short[k], reference[k]) for k in short)  # layer i is layer i of the long file


def test_tiny_write_is_fast(tmp_path):
    write_tiny_checkpoint(tmp_path / "warm")  # imports and tokenizer training happen once
    start = time.perf_counter()
    write_tiny_checkpoint(tmp_path / "timed", seed=7)
    assert time.perf_counter() - start < 2.0


def test_real_shapes_metadata(tmp_path):
    directory = write_tiny_checkpoint(tmp_path, shapes="qwen3-vl-30b-a3b", num_layers=1, metadata_only=True)
    assert not list(directory.glob("*.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (
        text["hidden_size"],
        text["num_hidden_layers"],
        text["num_attention_heads"],
        text["num_key_value_heads"],
        text["head_dim"],
        text["num_experts"],
        text["num_experts_per_tok"],
        text["moe_intermediate_size"],
        text["vocab_size"],
        text["rope_theta"],
        text["rope_scaling"]["mrope_section"],
    ) == (2048, 1, 32, 4, 128, 128, 8, 768, 151936, 5000000.0, [24, 20, 20])
    assert (
        vision["depth"],
        vision["hidden_size"],
        vision["num_heads"],
        vision["intermediate_size"],
        vision["out_hidden_size"],
        vision["num_position_embeddings"],
        vision["deepstack_visual_indexes"],
    ) == (27, 1152, 16, 4304, 2048, 2304, [8, 16, 24])
    assert config["torch_dtype"] == "bfloat16"
    ids = tiny_tokenizer.token_ids()
    assert (
        config["image_token_id"] == ids["<|image_pad|>"] and config["vision_start_token_id"] == ids["<|vision_start|>"]
    )
    assert (
        transformers.AutoTokenizer.from_pretrained(directory).convert_tokens_to_ids("<|video_pad|>")
        == config["video_token_id"]
    )
    assert json.loads((directory / "preprocessor_config.json").read_text())["size"] == {
        "longest_edge": 16777216,
        "shortest_edge": 65536,
    }
    # The index lists exactly the tensors transformers expects, at 2 bytes each, in ~2 GB shards.
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    with torch.device("meta"):
        model = transformers.Qwen3VLMoeForConditionalGeneration(transformers.AutoConfig.from_pretrained(directory))
    expected = model.state_dict()
    assert index["weight_map"].keys() == expected.keys()
    assert index["metadata"]["total_size"] == 2 * sum(t.numel() for t in expected.values())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    with pytest.raises(ValueError, match="no qwen2-moe variant"):
        write_tiny_checkpoint(tmp_path / "q2", arch="qwen2_moe", shapes="qwen3-vl-30b-a3b", metadata_only=True)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "splitvl", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_writes_a_checkpoint(vl_dir, tmp_path):
    result = run_cli("make-tiny", str(tmp_path / "vl"))
    assert result.returncode == 0, result.stderr
    for file in vl_dir.iterdir():  # another process, same bytes (tokenizer training included)
        assert (tmp_path / "vl" / file.name).read_bytes() == file.read_bytes(), file.name
    result = run_cli("make-tiny", str(tmp_path / "text"), "--text-only", "--seed", "3", "--layers", "2")
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "text" / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"]) == ("qwen3_moe", 2)
    assert "experts.0.gate_proj.weight" in " ".join(load_file(tmp_path / "text" / "model.safetensors"))
    help_text = run_cli("make-tiny", "--help").stdout
    assert "--shapes" in help_text and "--seed" in help_text and "qwen3-vl-30b-a3b" in help_text
    bad = run_cli("make-tiny", str(tmp_path / "bad"), "--text-only", "--arch", "qwen2-moe")
    assert bad.returncode != 0 and "--text-only" in bad.stderr
