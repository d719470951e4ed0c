"""Tensor and expert parallelism of the language model on CPU ranks over gloo (models/parallel.py,
models/sharding.py): each rank loads only its slices of a real safetensors checkpoint, and the
ranks together compute the one-rank model's logits (within 1e-5) and transformers' greedy tokens.
Every case runs real processes joined by a torch.distributed process group.

The ranks compute in float64 (the fp32 weights exactly): in fp32 the partial sums added in
another order alone move logits by up to 1.3e-5 (TP=2 on the tiny model), noise that would hide
a small real error; in float64 a correct split agrees to ~1e-12."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.loader import CheckpointError, load_model
from models.parallel import TensorParallel
from models.random_weights import random_language_model
from models.tiny_checkpoint import write_tiny_checkpoint
from tests.reference import hf_model, our_prompt_logits

PROMPT = [5, 17, 42, 99, 3, 150, 77, 8, 200, 64, 12]
NEW_TOKENS = 6
# Counts that divide by 3: 6 query heads, 3 KV heads, 6 experts, intermediate 48.
TP3_SHAPES = {"num_attention_heads": 6, "num_key_value_heads": 3, "num_experts": 6}
# One KV head: at TP=3 every rank holds a replica of it.
TP3_ONE_KV = {"num_attention_heads": 6, "num_key_value_heads": 1, "num_experts": 6}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, size: int, port: int, ckpt: str, expert_parallel: bool, dummy: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        tp = TensorParallel(rank, size, expert_parallel)
        if dummy:
            loaded = random_language_model(ckpt, torch.device("cpu"), torch.float64, tp=tp)
        else:
            loaded = load_model(ckpt, part="language", dtype=torch.float64, tp=tp)
        model = loaded.model
        logits = our_prompt_logits(model, loaded.config, PROMPT)
        ids = list(PROMPT)
        for _ in range(NEW_TOKENS):  # greedy, each step a whole prefill: no cache involved
            ids.append(int(our_prompt_logits(model, loaded.config, ids)[-1].argmax()))
        local_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if rank == 0:
            torch.save({"logits": logits, "tokens": ids[len(PROMPT) :], "bytes": local_bytes}, out)
    finally:
        dist.destroy_process_group()


def run_ranks(ckpt, size: int, expert_parallel: bool, tmp_path, dummy: bool = False) -> dict:
    out = str(tmp_path / f"rank0-{size}-{expert_parallel}-{dummy}.pt")
    mp.start_processes(
        _rank_main,
        args=(size, _free_port(), str(ckpt), expert_parallel, dummy, out),
        nprocs=size,
        start_method="spawn",
    )
    return torch.load(out)


@pytest.fixture(scope="module")
def tp3_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tp3"), seed=5, text_overrides=TP3_SHAPES)


@pytest.fixture(scope="module")
def tp3_one_kv_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tp3kv1"), seed=6, arch="qwen3_moe", text_overrides=TP3_ONE_KV)


def _check_against_one_rank(ckpt, size, expert_parallel, tmp_path):
    one = run_ranks(ckpt, 1, False, tmp_path)
    many = run_ranks(ckpt, size, expert_parallel, tmp_path)
    torch.testing.assert_close(many["logits"], one["logits"], atol=1e-5, rtol=0)
    print(f"TP={size} ep={expert_parallel}: max |logit diff| {(many['logits'] - one['logits']).abs().max():.2e}")
    assert many["tokens"] == one["tokens"]
    # A rank holds its share, not the model: well under the whole (norms and router replicate).
    assert many["bytes"] < one["bytes"] * (1 / size + 0.15)
    return one, many


@torch.no_grad()
def _hf_greedy(ckpt) -> list[int]:
    hf = hf_model(ckpt)
    out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(PROMPT) :].tolist()


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp", "tp+ep"])
def test_vl_language_model_at_tp2_matches_one_rank_and_transformers(vl_ckpt, expert_parallel, tmp_path):
    _, many = _check_against_one_rank(vl_ckpt, 2, expert_parallel, tmp_path)
    assert many["tokens"] == _hf_greedy(vl_ckpt)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp", "tp+ep"])
def test_vl_language_model_at_tp3_matches_one_rank_and_transformers(tp3_ckpt, expert_parallel, tmp_path):
    _, many = _check_against_one_rank(tp3_ckpt, 3, expert_parallel, tmp_path)
    assert many["tokens"] == _hf_greedy(tp3_ckpt)


def test_text_qwen3_moe_with_one_kv_head_replicated_over_three_ranks(tp3_one_kv_ckpt, tmp_path):
    _, many = _check_against_one_rank(tp3_one_kv_ckpt, 3, False, tmp_path)
    assert many["tokens"] == _hf_greedy(tp3_one_kv_ckpt)


def test_text_qwen3_moe_per_expert_checkpoint_at_tp2(qwen3_text_ckpt, tmp_path):
    _, many = _check_against_one_rank(qwen3_text_ckpt, 2, True, tmp_path)
    assert many["tokens"] == _hf_greedy(qwen3_text_ckpt)


def test_qwen2_moe_shared_expert_and_qkv_bias_at_tp2(qwen2_text_ckpt, tmp_path):
    _, many = _check_against_one_rank(qwen2_text_ckpt, 2, False, tmp_path)
    assert many["tokens"] == _hf_greedy(qwen2_text_ckpt)


def test_dummy_weights_at_tp2_are_the_one_rank_dummy_model(vl_ckpt, tmp_path):
    one = run_ranks(vl_ckpt, 1, False, tmp_path, dummy=True)
    many = run_ranks(vl_ckpt, 2, True, tmp_path, dummy=True)
    torch.testing.assert_close(many["logits"], one["logits"], atol=1e-5, rtol=0)


def test_a_shape_that_does_not_split_is_refused_naming_the_setting_and_counts(vl_ckpt):
    # The tiny model has 4 query heads, 2 KV heads and 8 experts: 3 ranks divide none of them.
    with pytest.raises(ValueError) as err:
        load_model(vl_ckpt, part="language", tp=TensorParallel(0, 3, expert_parallel=True))
    message = str(err.value)
    assert "tensor_parallel_size=3" in message
    assert "num_attention_heads=4" in message
    assert "num_key_value_heads=2" in message
    assert "num_experts=8" in message


def test_only_the_language_part_splits(vl_ckpt):
    with pytest.raises(CheckpointError, match="only the language part"):
        load_model(vl_ckpt, part="full", tp=TensorParallel(0, 2))


def test_a_rank_reads_only_its_slices_of_the_file(vl_ckpt):
    """The safetensors slice API reads the rank's rows, not whole tensors: the copy a rank makes
    of the embedding is its half, and the parameters of two ranks tile the one-rank model."""
    whole = load_model(vl_ckpt, part="language", dtype=torch.float32).model.state_dict()
    halves = [
        load_model(vl_ckpt, part="language", dtype=torch.float32, tp=TensorParallel(r, 2)).model.state_dict()
        for r in range(2)
    ]
    vocab = whole["model.embed_tokens.weight"].shape[0]
    assert halves[0]["model.embed_tokens.weight"].shape[0] == vocab // 2
    joined = torch.cat([h["model.embed_tokens.weight"] for h in halves])[:vocab]
    assert torch.equal(joined, whole["model.embed_tokens.weight"])
    name = "model.layers.0.mlp.experts.gate_up_proj"
    inter = whole[name].shape[1] // 2
    gate = torch.cat([h[name][:, : inter // 2] for h in halves], dim=1)
    up = torch.cat([h[name][:, inter // 2 :] for h in halves], dim=1)
    assert torch.equal(torch.cat([gate, up], dim=1), whole[name])
