"""Parts of the runner that serve the GPU path, checked on CPU: the batched greedy sampler and
the random ("dummy") weights the benchmarks build on the device."""

from __future__ import annotations

import torch

from language_server.engine.request import EngineRequest
from language_server.engine.sampler import (
    _apply_penalties,
    _pick,
    make_generator,
    sample,
)
from language_server.protocol import GenerateRequest, SamplingParams
from models.backends import torch_kernels
from models.forward_context import prefill_context
from models.random_weights import random_language_model
from models.tiny_checkpoint import write_tiny_checkpoint


def request(params: SamplingParams, token_ids: list[int]) -> EngineRequest:
    req = EngineRequest(request=GenerateRequest("r", token_ids[:3], params))
    req.token_ids, req.num_prompt_tokens = list(token_ids), 3
    req.generator = make_generator(params, torch.device("cpu"))
    return req


def test_batched_greedy_rows_match_one_row_at_a_time():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(7, 300, generator=gen) * 4).to(torch.bfloat16)
    logits[3, 17] = logits[3, 18] = logits[3].max() + 1  # a tie: the first index wins either way
    history = [5, 9, 9, 42, 17]
    params = [
        SamplingParams(max_tokens=4, temperature=0.0),
        SamplingParams(max_tokens=4, temperature=0.0, logprobs=2),
        SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=1.5),
        SamplingParams(max_tokens=4, temperature=0.0),
        SamplingParams(max_tokens=4, temperature=0.8, top_k=20, seed=3),
        SamplingParams(max_tokens=4, temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3),
        SamplingParams(max_tokens=4, temperature=0.0),
    ]
    tokens, entries = sample(logits, [request(p, history) for p in params])
    for row, p in enumerate(params):
        req = request(p, history)  # a fresh generator: the seeded row must draw the same
        assert tokens[row] == _pick(_apply_penalties(logits[row].float(), req, p), p, req.generator), row
    assert tokens[3] == 17
    assert entries[1].token_id == tokens[1] and len(entries[1].top) == 2
    assert all(e is None for i, e in enumerate(entries) if i != 1)
    # All rows greedy: the one-argmax path.
    all_greedy, _ = sample(logits, [request(params[0], history) for _ in range(7)])
    assert all_greedy == logits.float().argmax(-1).tolist()


def test_random_weights_are_unit_scale_and_decisive(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "meta", metadata_only=True)
    loaded = random_language_model(str(ckpt), torch.device("cpu"), torch.float32)
    model, text = loaded.model, loaded.config.text
    params = dict(model.named_parameters())
    assert abs(params["model.layers.0.input_layernorm.weight"].mean().item() - 1) < 0.05
    assert abs(params["lm_head.weight"].std().item() * text.hidden_size**0.5 - 6) < 0.3
    # Same seed, same weights.
    again = dict(random_language_model(str(ckpt), torch.device("cpu"), torch.float32).model.named_parameters())
    assert all(torch.equal(params[n], again[n]) for n in params)
    ids = torch.randint(1, 400, (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ctx = prefill_context(torch_kernels(), [24], positions=torch.arange(24).expand(3, -1))
        hidden = model(ids, ctx)
        logits = model.compute_logits(hidden)
        router = model.model.layers[1].mlp.gate(model.model.layers[1].post_attention_layernorm(hidden, ctx.ops))
    assert torch.isfinite(logits).all() and 0.5 < hidden.std().item() < 3  # unit-scale activations
    top2 = logits.topk(2).values
    assert (top2[:, 0] - top2[:, 1]).median() > 1  # greedy is not a coin flip
    assert router.std() > 1.5  # decisive routing
