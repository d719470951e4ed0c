"""A validated request -> the engine's SamplingParams, with the checks that need the prompt."""

from __future__ import annotations

from language_server.api.errors import bad_request
from language_server.api.model_info import ServedModel
from language_server.api.schemas import SamplingFields
from language_server.protocol import LOGIT_BIAS_LIMIT, SamplingParams

_INT64 = 2**63


# Field -> why it is refused. Each is a 400 naming the field, never an answer that ignored it.
_UNSUPPORTED = {
    "functions": "The deprecated 'functions' field is not supported; send 'tools' instead.",
    "function_call": "The deprecated 'function_call' field is not supported; send 'tool_choice' instead.",
    "reasoning_effort": "reasoning_effort is not supported: this service has no control over reasoning length.",
    "verbosity": "verbosity is not supported by this service.",
    "audio": "Audio output is not supported: this model produces text only.",
    "prediction": "Predicted outputs are not supported by this service.",
    "web_search_options": "Web search is not supported by this service.",
}


def refuse_unsupported(req: SamplingFields) -> None:
    """Fields OpenAI has that we don't serve: an error beats an answer that ignored them."""
    for name, reason in _UNSUPPORTED.items():
        if getattr(req, name, None) is not None:
            raise bad_request(reason, param=name, code="unsupported_parameter")
    if req.modalities is not None and req.modalities != ["text"]:
        raise bad_request(
            "Only the 'text' output modality is supported.", param="modalities", code="unsupported_parameter"
        )
    if req.service_tier not in (None, "auto", "default"):
        raise bad_request("service_tier may only be 'auto' or 'default' here (one tier).", param="service_tier")


def logit_bias(req: SamplingFields, model: ServedModel) -> list[tuple[int, float]]:
    """OpenAI's {"token id": bias} -> [(id, bias)], each id in the vocabulary, each bias in ±100."""
    out = []
    for key, bias in (req.logit_bias or {}).items():
        if not key.isdigit() or not 0 <= int(key) < model.vocab_size:
            raise bad_request(
                f"logit_bias key {key!r} is not a token id in [0, {model.vocab_size}).", param="logit_bias"
            )
        if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
            raise bad_request(f"logit_bias[{key}] is {bias}; biases must be from -100 to 100.", param="logit_bias")
        out.append((int(key), float(bias)))
    return out


# Each generated token is checked against every stop string on the event loop; OpenAI allows 4.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024  # a stop string's prefix is held back from a stream until it cannot match
# Engine requests one HTTP request may start (n, times the prompts of a completions batch): the
# admission limit counts HTTP requests, so this bounds what one of them may queue.
MAX_CHOICES = 128


def stop_strings(req: SamplingFields) -> list[str]:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stops):
        raise bad_request("Stop strings must not be empty.", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"{len(stops)} stop strings; at most {MAX_STOP_STRINGS} are allowed.", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"Stop strings may be at most {MAX_STOP_CHARS} characters long.", param="stop")
    return stops


def check_choices(prompts: int, n: int) -> None:
    if prompts * n > MAX_CHOICES:
        raise bad_request(
            f"{prompts} prompts × n={n} would start {prompts * n} generations; one request may start "
            f"at most {MAX_CHOICES}. Split the batch.",
            param="prompt" if prompts > 1 else "n",
        )


def sampling_params(
    req: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_len: int,
    model: ServedModel,
    max_model_len: int,
    prompt_param: str,
) -> SamplingParams:
    """Parameters for the first choice; `for_choice` derives the others. prompt_len counts one token
    per image: the engine checks the length again once images are expanded."""
    limit = max_model_len
    if prompt_len >= limit:
        raise bad_request(
            f"The prompt is {prompt_len} tokens; this model's maximum context length is {limit}. Shorten it.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = limit - prompt_len
    elif prompt_len + max_tokens > limit:
        raise bad_request(
            f"The prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
            f"maximum context length of {limit}. Lower max_tokens or shorten the prompt.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if req.min_tokens is not None and req.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens}).", param="min_tokens"
        )
    for token_id in req.stop_token_ids or []:
        if not 0 <= token_id < model.vocab_size:
            raise bad_request(
                f"stop_token_ids holds {token_id}, outside the vocabulary [0, {model.vocab_size}).",
                param="stop_token_ids",
            )
    defaults = model.sampling_defaults

    def pick(name: str, fallback: float) -> float:
        value = getattr(req, name)
        return value if value is not None else defaults.get(name, fallback)

    top_k = int(pick("top_k", 0))
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(pick("temperature", 1.0)),
        top_p=float(pick("top_p", 1.0)),
        top_k=max(top_k, 0),  # -1 and 0 both mean "off"
        min_p=float(pick("min_p", 0.0)),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        seed=req.seed,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=bool(req.ignore_eos),
        min_tokens=req.min_tokens or 0,
        logprobs=logprobs,
        logit_bias=logit_bias(req, model),
    )


def for_choice(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of n gets seed + i: reproducible, yet the n choices differ from each other."""
    if params.seed is None or index == 0:
        return params
    seed = (params.seed + index + _INT64) % (2 * _INT64) - _INT64
    return SamplingParams(**{**params.__dict__, "seed": seed})
