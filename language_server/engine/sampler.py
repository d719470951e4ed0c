"""Sampling on the model's device: grammars, logit bias, penalties, temperature, top-k / top-p /
min-p, seeds, logprobs.

Semantics follow OpenAI and vLLM, in this order:
- a constrained request (structured output) has every token its grammar forbids at -inf
  (xgrammar's bitmask, applied in place for the constrained rows only);
- logprobs are those of the model's distribution (log_softmax of the raw logits), as vLLM does;
  for a constrained row, of that distribution within its grammar (what vLLM reports too): masked
  tokens have no mass and never appear among the top alternatives;
- logit_bias (OpenAI) adds each bias to its token's logit, after the logprobs are taken; a token
  the grammar forbids stays forbidden;
- before min_tokens tokens, the request's stop tokens (EOS unless ignore_eos, stop_token_ids)
  cannot be drawn (their logits are -inf), as vLLM does; unless the grammar allows nothing else
  (it is complete and waits for its end token): the grammar wins, since no other token can follow;
- repetition_penalty (HF/vLLM): logits of tokens seen in the prompt or output are divided by
  the penalty when positive, multiplied when negative;
- presence/frequency penalty (OpenAI): subtract presence·[count > 0] + frequency·count over
  the generated tokens;
- temperature 0 is greedy; otherwise softmax(logits / temperature) filtered by top_k, top_p
  (smallest set whose mass reaches p) and min_p (tokens under min_p·max prob dropped);
- a request with a seed draws from its own generator, so it repeats exactly whatever else is
  in the batch.
Legend: B rows (one per sequence being sampled), V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from language_server.engine.request import EngineRequest
from language_server.protocol import SamplingParams, TokenLogprob


def sample(logits: torch.Tensor, requests: Sequence[EngineRequest]) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits [B, V] (any float dtype) -> one token id and its logprob entry per request."""
    scores = logits.float()
    constrained = [row for row, req in enumerate(requests) if req.matcher is not None]
    biased = [
        (row, req.request.sampling.logit_bias) for row, req in enumerate(requests) if req.request.sampling.logit_bias
    ]
    banned = [
        (row, req.min_tokens_banned)
        for row, req in enumerate(requests)
        if req.min_tokens_banned and len(req.output_ids) < req.request.sampling.min_tokens
    ]
    if (constrained or biased or banned) and scores.data_ptr() == logits.data_ptr():
        # The edits below are in place, and float() of float32 logits is the caller's own tensor
        # (a graph's output buffer, say): edit a copy.
        scores = scores.clone()
    if constrained:
        _apply_grammars(scores, requests, constrained)
    raw_logprobs = (
        torch.log_softmax(scores, dim=-1) if any(r.request.sampling.logprobs is not None for r in requests) else None
    )
    if biased:
        _apply_logit_bias(scores, biased)
    if banned:
        _ban_stop_tokens(scores, banned, set(constrained))
    # Plain greedy rows (no penalties) take one batched argmax and one device sync between them,
    # instead of one sync per row: at a decode batch of 256 that is milliseconds a step.
    plain = [row for row, req in enumerate(requests) if _is_plain_greedy(req.request.sampling)]
    if len(plain) == len(requests):
        greedy = scores.argmax(dim=-1).tolist()
    elif plain:
        greedy = scores[torch.tensor(plain, device=scores.device)].argmax(dim=-1).tolist()
    else:
        greedy = []
    picked = dict(zip(plain, greedy))
    # Unseeded sampled rows draw together: one filter pass and one multinomial, one device sync
    # (one per row cost ~40% of decode throughput at 64 rows). Seeded rows draw from their own
    # generators, one at a time, so each repeats exactly whatever else is in the batch.
    shared = [
        row
        for row, req in enumerate(requests)
        if row not in picked and req.generator is None and req.request.sampling.temperature > 0.0
    ]
    if shared:
        rows = torch.stack(
            [_apply_penalties(scores[row], requests[row], requests[row].request.sampling) for row in shared]
        )
        probs = _filtered_probs(rows, [requests[row].request.sampling for row in shared])
        picked.update(zip(shared, torch.multinomial(probs, 1).squeeze(1).tolist()))
    tokens: list[int] = []
    entries: list[TokenLogprob | None] = []
    for row, req in enumerate(requests):
        params = req.request.sampling
        tok = picked.get(row)
        if tok is None:
            tok = _pick(_apply_penalties(scores[row], req, params), params, req.generator)
        tokens.append(tok)
        entries.append(
            _logprob_entry(raw_logprobs[row], tok, params.logprobs)
            if raw_logprobs is not None and params.logprobs is not None
            else None
        )
    return tokens, entries


def _apply_grammars(scores: torch.Tensor, requests: Sequence[EngineRequest], rows: list[int]) -> None:
    """Tokens each constrained row's grammar forbids -> -inf, in place, in one batched call."""
    import xgrammar as xgr  # loaded by the first compile already; a dictionary look-up here

    # `indices` address the bitmask's rows and the logits' alike, so the bitmask spans the rows up
    # to the last constrained one; those of unconstrained rows are never read.
    bitmask = xgr.allocate_token_bitmask(rows[-1] + 1, scores.shape[-1])
    # A row whose grammar allows every token (free text inside a structural tag) needs no mask.
    masked = [row for row in rows if requests[row].matcher.fill_next_token_bitmask(bitmask, row)]
    if masked:
        xgr.apply_token_bitmask_inplace(scores, bitmask.to(scores.device), indices=masked)


def _apply_logit_bias(scores: torch.Tensor, biased: list[tuple[int, list]]) -> None:
    """Each (token id, bias) of each row added to its logit, in place, in one scatter."""
    rows = [row for row, pairs in biased for _ in pairs]
    ids = [int(tok) for _, pairs in biased for tok, _ in pairs]
    values = [float(bias) for _, pairs in biased for _, bias in pairs]
    dev = scores.device
    scores.index_put_(
        (torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)),
        torch.tensor(values, device=dev, dtype=scores.dtype),
        accumulate=True,
    )


def _ban_stop_tokens(scores: torch.Tensor, banned: list[tuple[int, frozenset[int]]], constrained: set[int]) -> None:
    """min_tokens: the rows' stop tokens -> -inf, in place. A grammar that allows nothing but a
    stop token (it is complete) keeps it: banning it would leave the row nothing to draw."""
    for row, ids in banned:
        kept = scores[row].index_fill(0, torch.tensor(sorted(ids), device=scores.device), float("-inf"))
        if row in constrained:
            kept = torch.where((kept > float("-inf")).any(), kept, scores[row])  # on the device: no sync
        scores[row] = kept


def _is_plain_greedy(params: SamplingParams) -> bool:
    return (
        params.temperature == 0.0
        and params.repetition_penalty == 1.0
        and not params.presence_penalty
        and not params.frequency_penalty
    )


def _apply_penalties(scores: torch.Tensor, req: EngineRequest, params: SamplingParams) -> torch.Tensor:
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.token_ids)), device=scores.device, dtype=torch.long)
        picked = scores[seen]
        scores = scores.clone()
        scores[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and req.output_ids:
        out = torch.tensor(req.output_ids, device=scores.device, dtype=torch.long)
        counts = torch.bincount(out, minlength=scores.shape[0]).to(scores.dtype)
        scores = scores - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(scores.dtype)
    return scores


def _pick(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    if params.temperature == 0.0:
        return int(scores.argmax())
    probs = _filtered_probs(scores.unsqueeze(0), [params])
    return int(torch.multinomial(probs, 1, generator=generator))


def _filtered_probs(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """[R, V] scores of sampled rows -> [R, V] probabilities after each row's temperature,
    top_k (ties with the k-th kept), min_p and top_p (mass before a token under top_p keeps it,
    so the first always stays; applied to the min_p-filtered probabilities, unnormalized)."""
    dev, vocab = scores.device, scores.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=dev, dtype=scores.dtype).unsqueeze(1)
    scores = scores / temperature
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        k = torch.tensor(top_k, device=dev)
        kth = torch.sort(scores, dim=-1, descending=True).values.gather(1, (k - 1).clamp(min=0).unsqueeze(1))
        scores = scores.masked_fill((scores < kth) & (k > 0).unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    min_p = [p.min_p for p in params]
    if any(m > 0.0 for m in min_p):
        floor = torch.tensor(min_p, device=dev, dtype=probs.dtype).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    top_p = [p.top_p for p in params]
    if any(p < 1.0 for p in top_p):
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        limit = torch.tensor(top_p, device=dev, dtype=probs.dtype).unsqueeze(1)
        drop = ((sorted_probs.cumsum(-1) - sorted_probs) >= limit) & (limit < 1.0)
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs


def _logprob_entry(logprobs: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    top: list[tuple[int, float]] = []
    if top_n > 0:
        values, ids = torch.topk(logprobs, top_n)
        # A grammar's masked tokens (-inf) are no alternative: the list may be shorter than top_n.
        top = [(i, v) for i, v in zip(ids.tolist(), values.tolist()) if v > float("-inf")]
    return TokenLogprob(token_id=token, logprob=float(logprobs[token]), top=top)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator for seeded requests; unseeded ones use the global RNG."""
    if params.temperature == 0.0 or params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen
