"""The sampler's filters (temperature, top_k, min_p, top_p) row by row, and unseeded sampled rows
drawn together in one batch: each row gets its own filters and its own token."""

from __future__ import annotations

import torch

from language_server.engine.request import EngineRequest
from language_server.engine.sampler import _filtered_probs, make_generator, sample
from language_server.protocol import GenerateRequest, SamplingParams

LOGITS = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))


def test_each_filter_keeps_what_it_should():
    def kept(**params) -> list[int]:
        probs = _filtered_probs(LOGITS.unsqueeze(0), [SamplingParams(max_tokens=1, **params)])[0]
        return [i for i, p in enumerate(probs.tolist()) if p > 0]

    assert kept() == [0, 1, 2, 3]
    assert kept(top_k=2) == [0, 1]
    assert kept(min_p=0.4) == [0, 1, 2]  # 0.1 < 0.4 * 0.4 <= 0.2
    assert kept(top_p=0.6) == [0, 1]  # 0.4 alone is under 0.6; 0.4 + 0.3 reaches it
    assert kept(top_p=0.4) == [0]
    probs = _filtered_probs(LOGITS.unsqueeze(0), [SamplingParams(max_tokens=1, temperature=0.5)])[0]
    assert torch.allclose(probs, torch.softmax(LOGITS / 0.5, dim=-1))


def test_rows_in_one_batch_filter_as_they_would_alone():
    rows = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    params = [
        SamplingParams(max_tokens=1, temperature=t, top_k=k, top_p=p, min_p=m)
        for t, k, p, m in (
            (1.0, 0, 1.0, 0.0),
            (0.7, 5, 1.0, 0.0),
            (1.3, 0, 0.8, 0.0),
            (1.0, 10, 0.9, 0.05),
            (0.9, 64, 1.0, 0.2),
        )
    ]
    together = _filtered_probs(rows, params)
    for i, row_params in enumerate(params):
        assert torch.equal(together[i], _filtered_probs(rows[i : i + 1], [row_params])[0]), i


def _request(rid: str, params: SamplingParams) -> EngineRequest:
    req = EngineRequest(request=GenerateRequest(rid, [1, 2, 3], params), token_ids=[1, 2, 3], num_prompt_tokens=3)
    req.generator = make_generator(params, torch.device("cpu"))
    return req


def test_unseeded_rows_drawn_together_each_get_their_own_token():
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(1))
    # top_k=1 leaves one token per row: a row that took another row's draw would show it.
    requests = [_request(f"r{i}", SamplingParams(max_tokens=4, temperature=1.0 + i / 10, top_k=1)) for i in range(6)]
    tokens, _ = sample(logits, requests)
    assert tokens == logits.argmax(dim=-1).tolist()


def test_a_seeded_row_repeats_whatever_else_is_in_the_batch():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(2))
    seeded = SamplingParams(max_tokens=4, temperature=1.0, top_p=0.95, seed=7)
    alone, _ = sample(logits[1:2], [_request("s", seeded)])
    mixed, _ = sample(
        logits,
        [
            _request("a", SamplingParams(max_tokens=4, temperature=1.0)),
            _request("s", seeded),
            _request("b", SamplingParams(max_tokens=4, temperature=0.5, top_k=3)),
        ],
    )
    assert mixed[1] == alone[0]
