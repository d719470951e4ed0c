"""Structured outputs in the engine, in-process on CPU: constraints compiled by xgrammar on the
grammar workers, each step's logits masked to what the grammar allows, matchers advanced after a
step succeeds; logit_bias. The models are tiny random checkpoints, so whatever the output is
valid because of the grammar alone."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch
import xgrammar as xgr
from transformers import AutoTokenizer

import language_server.engine.grammar as grammar_module
from language_server.engine.core import EngineCore
from language_server.engine.encoder_client import EncodeOutcome
from language_server.protocol import Constraint, EngineReady, GenerateRequest, ImageRef, RequestOutput, SamplingParams
from language_server.settings import LanguageSettings
from splitvl.offline import OfflineGenerator
from transfer.messages import EncodeResult

try:
    import jsonschema
except ImportError:  # not a dependency: the checks below are by hand, and this one joins if present
    jsonschema = None

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 99},
        # xgrammar 0.2.9 alone lets a length-bounded string hold raw control characters, which
        # json.loads refuses (mlc-ai/xgrammar#800); the random model writes them.
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["color", "count", "tags"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            # A pattern, not maxLength: the engine compiles a structural tag as it comes (the HTTP
            # process swaps in json_grammar.py's JSON), so xgrammar's length-bounded strings stay loose.
            "properties": {
                "city": {"type": "string", "pattern": "[A-Za-z ]{1,10}"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
REGEX = r"[a-z]{3}-[0-9]{2}"
PROMPT = [5, 6, 7, 8, 9]


def make_engine(ckpt, **overrides) -> EngineCore:
    return EngineCore(LanguageSettings(model=str(ckpt), **overrides))


def run_all(engine: EngineCore, requests: list[GenerateRequest], timeout_s: float = 60) -> dict[str, list]:
    """Submit everything, then poll compiles and step (as the engine loop does) until all is done."""
    outputs: dict[str, list[RequestOutput]] = {}

    def collect(outs: list[RequestOutput]) -> None:
        for o in outs:
            outputs.setdefault(o.request_id, []).append(o)

    for r in requests:
        collect(engine.add_request(r))
    deadline = time.monotonic() + timeout_s
    while engine.has_work() or engine.compiling:
        assert time.monotonic() < deadline, "the engine did not finish"
        collect(engine.poll_grammars())
        if engine.has_work():
            collect(engine.step())
        else:
            time.sleep(0.001)  # a compile is running; the engine loop's idle poll
    return outputs


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def constrained(
    rid: str,
    kind: str,
    source: str = "",
    seed: int | None = 0,
    max_tokens: int = 120,
    prompt: list[int] = PROMPT,
    **sampling,
) -> GenerateRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0 if seed is None else 1.0, seed=seed, **sampling)
    return GenerateRequest(rid, list(prompt), params, constraint=Constraint(kind, source))


def big_schema(width: int, depth: int) -> str:
    """A schema whose compile takes tens of milliseconds on the tiny vocabulary."""

    def node(level: int) -> dict:
        if level == 0:
            return {"type": "string", "pattern": "[a-z]{2,8}"}
        return {
            "type": "object",
            "properties": {f"k{i}": node(level - 1) for i in range(width)},
            "required": [f"k{i}" for i in range(width)],
        }

    return json.dumps(node(depth))


@pytest.fixture(scope="module")
def ckpt(qwen3_text_ckpt):
    return qwen3_text_ckpt


@pytest.fixture(scope="module")
def engine(ckpt):
    core = make_engine(ckpt)
    yield core
    core.close()


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return AutoTokenizer.from_pretrained(ckpt)


def finished(outs: list[RequestOutput], max_tokens: int, reason: str = "stop") -> list[int]:
    last = outs[-1]
    assert last.finished and last.finish_reason == reason, (last.finish_reason, last.error_message)
    ids = tokens_of(outs)
    assert len(ids) < max_tokens
    return ids


def check_schema(value: object) -> None:
    """SCHEMA by hand (and by jsonschema where installed); strict mode also forbids other keys."""
    assert isinstance(value, dict) and list(value) == ["color", "count", "tags"], value
    assert value["color"] in ("red", "green", "blue")
    assert isinstance(value["count"], int) and not isinstance(value["count"], bool) and 1 <= value["count"] <= 99
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3
    assert all(isinstance(t, str) and len(t) <= 8 for t in value["tags"])
    if jsonschema is not None:
        jsonschema.validate(value, SCHEMA)


# ----- each kind of constraint ---------------------------------------------------------------


def test_json_schema_output_validates_and_ends(engine, tokenizer):
    for seed in range(4):
        outs = run_all(engine, [constrained(f"schema{seed}", "json_schema", json.dumps(SCHEMA), seed)])
        text = tokenizer.decode(finished(outs[f"schema{seed}"], 120), skip_special_tokens=True)
        check_schema(json.loads(text))
        assert text.startswith('{"color": "')  # compact: no free whitespace, so it ends


def test_json_object_gives_an_object(engine, tokenizer):
    # Inside a string the grammar allows almost any token, and a random model rarely closes one:
    # a bias towards '"' and '}' keeps strings short. Without the grammar it would write '""}}'.
    bias = [(tokenizer.convert_tokens_to_ids('"'), 12.0), (tokenizer.convert_tokens_to_ids("}"), 12.0)]
    for seed in range(3):
        outs = run_all(engine, [constrained(f"obj{seed}", "json_object", "", seed, logit_bias=bias)])
        text = tokenizer.decode(finished(outs[f"obj{seed}"], 120), skip_special_tokens=True)
        assert isinstance(json.loads(text), dict), text


def test_regex_is_matched_exactly_and_ends_even_with_ignore_eos(engine, tokenizer):
    for seed in range(3):
        outs = run_all(engine, [constrained(f"re{seed}", "regex", REGEX, seed, ignore_eos=True)])
        ids = finished(outs[f"re{seed}"], 120)
        assert ids[-1] in engine.eos_ids  # the grammar's end: its stop token, though EOS is ignored
        assert re.fullmatch(REGEX, tokenizer.decode(ids, skip_special_tokens=True))


def test_ebnf_grammar(engine, tokenizer):
    ebnf = 'root ::= answer " (" [0-9] ")"\nanswer ::= "yes" | "no" | "maybe"'
    for seed in (None, 0, 1):
        outs = run_all(engine, [constrained(f"ebnf{seed}", "grammar", ebnf, seed)])
        text = tokenizer.decode(finished(outs[f"ebnf{seed}"], 120), skip_special_tokens=True)
        assert re.fullmatch(r"(yes|no|maybe) \([0-9]\)", text), text


def test_structural_tag_tool_call_has_valid_arguments(engine, tokenizer):
    # No think block (reasoning off), one call; whitespace bounded, else a random model pads on.
    tag = xgr.get_model_structural_tag(
        "qwen_3",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        reasoning=False,
        parallel_tool_calls=False,
        max_whitespace_cnt=1,
    )
    for seed in range(3):
        outs = run_all(engine, [constrained(f"tool{seed}", "structural_tag", tag.model_dump_json(), seed, 200)])
        text = tokenizer.decode(finished(outs[f"tool{seed}"], 200), skip_special_tokens=True)
        begin, end = '<tool_call>\n{"name": "get_weather", "arguments": ', "}\n</tool_call>"
        assert text.startswith(begin) and text.endswith(end), text
        arguments = json.loads(text[len(begin) : -len(end)])
        assert list(arguments) == ["city", "days"] and isinstance(arguments["city"], str)
        assert re.fullmatch("[A-Za-z ]{1,10}", arguments["city"]) and arguments["days"] in range(1, 8)


# ----- batching, caching, failures ------------------------------------------------------------


def test_constrained_and_unconstrained_requests_in_one_batch(ckpt, engine, tokenizer, monkeypatch):
    """The grammar mask touches only its own rows: greedy unconstrained requests beside
    constrained ones give exactly the tokens they give alone."""
    ref = OfflineGenerator(ckpt)
    rng = random.Random(0)
    free = [
        GenerateRequest(
            f"free{i}",
            [rng.randrange(1, 400) for _ in range(rng.randrange(3, 20))],
            SamplingParams(max_tokens=8, temperature=0.0),
        )
        for i in range(4)
    ]
    bound = [
        constrained("bound-greedy", "json_schema", json.dumps(SCHEMA), None),
        constrained("bound-sampled", "regex", REGEX, 3, logprobs=2),
    ]
    mixed_steps = []
    run = engine.runner.run

    def recording(chunks):
        kinds = {c.request.matcher is not None for c in chunks if c.samples}
        mixed_steps.append(kinds == {True, False})
        return run(chunks)

    monkeypatch.setattr(engine.runner, "run", recording)
    outs = run_all(engine, [free[0], bound[0], free[1], bound[1], *free[2:]])
    assert any(mixed_steps)  # constrained and unconstrained rows were sampled in one step
    for r in free:
        assert tokens_of(outs[r.request_id]) == ref.generate_ids(r.prompt_token_ids, max_tokens=8), r.request_id
    check_schema(json.loads(tokenizer.decode(finished(outs["bound-greedy"], 120), skip_special_tokens=True)))
    assert re.fullmatch(REGEX, tokenizer.decode(finished(outs["bound-sampled"], 120), skip_special_tokens=True))


def test_copies_of_one_schema_compile_once(ckpt, monkeypatch, tokenizer):
    compiles: list[xgr.GrammarCompiler] = []
    real = xgr.GrammarCompiler.compile_grammar  # JSON schemas are compiled as their grammar

    def counting(self, *args, **kwargs):
        compiles.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(xgr.GrammarCompiler, "compile_grammar", counting)
    engine = make_engine(ckpt)
    schema = json.dumps(SCHEMA)
    outs = run_all(engine, [constrained(f"copy{i}", "json_schema", schema, i) for i in range(4)])
    assert len(compiles) == 1  # the copies in flight together shared one compile
    for i in range(4):
        check_schema(json.loads(tokenizer.decode(finished(outs[f"copy{i}"], 120), skip_special_tokens=True)))
    cache_bytes = compiles[0].get_cache_size_bytes()
    assert cache_bytes > 0
    run_all(engine, [constrained("copy-later", "json_schema", schema, 9, 4)])
    assert compiles[0].get_cache_size_bytes() == cache_bytes  # served from xgrammar's cache
    engine.close()


def test_an_invalid_constraint_ends_only_its_request(ckpt, engine):
    ref = OfflineGenerator(ckpt)
    bad = {
        "schema": ("json_schema", '{"type": "nope"}', "nope"),
        "regex": ("regex", "[a-", "Unclosed"),
        "ebnf": ("grammar", "root ::= missing", "missing"),
        "tag": ("structural_tag", "{not json", "JSON"),
    }
    requests = [constrained(f"bad-{name}", kind, source) for name, (kind, source, _) in bad.items()]
    requests.insert(2, GenerateRequest("fine", PROMPT, SamplingParams(max_tokens=12, temperature=0.0)))
    outs = run_all(engine, requests)
    for name, (_, _, words) in bad.items():
        (out,) = outs[f"bad-{name}"]
        assert out.finish_reason == "error" and out.error_status == 400 and out.error_code == "invalid_grammar", out
        assert words in out.error_message and not out.error_message.startswith("[")  # no C++ log prefix
        assert len(out.error_message) <= 400
    assert tokens_of(outs["fine"]) == ref.generate_ids(PROMPT, max_tokens=12)


def test_a_compile_past_the_limit_is_too_complex_and_the_engine_serves_on(ckpt, hang):
    engine = make_engine(ckpt, grammar_compile_timeout_s=1e-4)
    schema = big_schema(10, 2)
    assert engine.add_request(constrained("complex", "json_schema", schema)) == []
    # Polled only once the compile is done: what counts is how long it took, not when it is polled.
    hang.wait(hang.finished, schema)
    (out,) = engine.poll_grammars()
    assert out.finish_reason == "error" and (out.error_status, out.error_code) == (400, "grammar_too_complex")
    assert "grammar_compile_timeout_s" in out.error_message and "0.0001 s" in out.error_message
    plain = GenerateRequest("plain", PROMPT, SamplingParams(max_tokens=6, temperature=0.0))
    assert run_all(engine, [plain])["plain"][-1].finish_reason in ("stop", "length")
    engine.close()


@dataclass
class Hang:
    sources: set[str] = field(default_factory=set)  # compiles of these block until `release`
    release: threading.Event = field(default_factory=threading.Event)
    started: list[str] = field(default_factory=list)  # sources of every compile begun
    finished: list[str] = field(default_factory=list)  # ... and returned

    def wait(self, what: list[str], *sources: str) -> None:
        deadline = time.monotonic() + 10
        while not set(sources) <= set(what):
            assert time.monotonic() < deadline
            time.sleep(0.002)


@pytest.fixture
def hang(monkeypatch):
    """Compiles that cannot be interrupted, as a pathological grammar's: those of the sources in
    `hang.sources` block until `hang.release` is set."""
    hang = Hang()
    real = grammar_module._compile

    def compile_or_hang(compiler, kind, source):
        hang.started.append(source)
        if source in hang.sources:
            hang.release.wait(30)
        try:
            return real(compiler, kind, source)
        finally:
            hang.finished.append(source)

    monkeypatch.setattr(grammar_module, "_compile", compile_or_hang)
    yield hang
    hang.release.set()


def test_stuck_compiles_block_neither_the_engine_nor_later_compiles(ckpt, tokenizer, hang):
    hang.sources.update({"[a-z]+", "[0-9]+"})
    engine = make_engine(ckpt, grammar_compile_timeout_s=0.5)
    started = time.monotonic()
    # Both workers hang; the plain request runs meanwhile, and the regex compiles once they are written off.
    outs = run_all(
        engine,
        [
            constrained("hang1", "regex", "[a-z]+"),
            constrained("hang2", "regex", "[0-9]+"),
            GenerateRequest("plain", PROMPT, SamplingParams(max_tokens=6, temperature=0.0)),
            constrained("later", "regex", REGEX),
        ],
    )
    assert time.monotonic() - started < 10
    for rid in ("hang1", "hang2"):
        assert outs[rid][-1].error_code == "grammar_too_complex"
    assert outs["plain"][-1].finish_reason in ("stop", "length")
    assert re.fullmatch(REGEX, tokenizer.decode(finished(outs["later"], 120), skip_special_tokens=True))
    assert not hang.sources & set(hang.finished)  # all of it while the stuck compiles still ran
    engine.close()


def test_abort_while_compiling(ckpt, hang):
    """Aborted while its compile runs (it runs on, its result unused) or while queued behind busy
    workers (it is never compiled)."""
    hang.sources.update({"[a-z]+", "[0-9]+"})
    engine = make_engine(ckpt)
    for r in (constrained("running", "regex", "[a-z]+"), constrained("other", "regex", "[0-9]+", max_tokens=4)):
        assert engine.add_request(r) == []
    hang.wait(hang.started, "[a-z]+", "[0-9]+")  # both workers busy
    assert engine.add_request(constrained("queued", "regex", REGEX)) == []
    assert not engine.has_work()
    for rid in ("running", "queued"):
        (out,) = engine.abort(rid)
        assert out.finished and out.finish_reason == "abort"
    assert set(engine.compiling) == {"other"} and set(engine.requests) == {"other"}
    hang.release.set()
    hang.wait(hang.finished, "[a-z]+")
    outs = run_all(engine, [])
    assert set(outs) == {"other"} and outs["other"][-1].finish_reason in ("stop", "length")
    assert REGEX not in hang.started and not engine.grammars.pending
    engine.close()


def test_a_failed_step_is_rerun_exactly_with_matchers(ckpt, engine, monkeypatch, tokenizer):
    """The step fails after sampling whenever "poison" is in the batch: the reruns in halves see
    matchers that the failed step did not advance, so greedy outputs equal a clean run's."""
    schema = json.dumps(SCHEMA)
    clean = tokens_of(run_all(engine, [constrained("clean", "json_schema", schema, None)])["clean"])
    run = engine.runner.run

    def fails_after_sampling(chunks):
        result = run(chunks)
        if any(c.request.request_id == "poison" for c in chunks):
            raise ValueError("a bug after sampling")
        return result

    monkeypatch.setattr(engine.runner, "run", fails_after_sampling)
    # All three wait for the same compile, so they start in one batch.
    requests = [constrained(rid, "json_schema", schema, None) for rid in ("a", "poison", "b")]
    failed_before = engine.failed_steps
    outs = run_all(engine, requests)
    assert outs["poison"][-1].error_status == 500
    assert engine.failed_steps - failed_before == 3  # [a, poison, b], then [poison, b], then [poison]
    assert tokens_of(outs["a"]) == tokens_of(outs["b"]) == clean


def test_preempted_constrained_requests_keep_their_matchers(ckpt, tokenizer):
    schema = json.dumps(SCHEMA)
    requests = [constrained(f"p{i}", "json_schema", schema, None, prompt=[10 + i] * 20) for i in range(4)]
    alone = {r.request_id: tokens_of(run_all(make_engine(ckpt), [r])[r.request_id]) for r in requests}
    tight = make_engine(ckpt, block_size=8, num_kv_blocks=14, enable_prefix_caching=False)
    outs = run_all(tight, requests)
    assert tight.scheduler.preemptions > 0
    for r in requests:
        assert tokens_of(outs[r.request_id]) == alone[r.request_id]
        check_schema(json.loads(tokenizer.decode(finished(outs[r.request_id], 120), skip_special_tokens=True)))


def test_an_image_request_waits_for_its_encode_and_its_grammar(vl_ckpt, monkeypatch, hang):
    hang.sources.add(REGEX)
    engine = make_engine(vl_ckpt)
    cfg = engine.config
    results: list[EncodeOutcome] = []
    monkeypatch.setattr(engine.encoders, "submit", lambda *args: None)  # the job is "out at an encoder"
    monkeypatch.setattr(engine.encoders, "poll", lambda: [results.pop() for _ in list(results)])
    ids = [5, cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id, 6]
    request = constrained("img", "regex", REGEX, prompt=ids)
    request.images = [ImageRef("data:,", "key")]
    assert engine.add_request(request) == []
    width = cfg.text.hidden_size * (1 + cfg.vision.num_deepstack_levels)
    rows = torch.randn(4 * 4 // cfg.vision.spatial_merge_size**2, width)
    results.append(
        EncodeOutcome("img", 0, EncodeResult(request_id="img", image_key="key", grid_thw=(1, 4, 4), embeddings=rows))
    )
    assert engine.poll_encoders() == [] and "img" not in engine.awaiting
    assert "img" in engine.compiling and not engine.has_work()  # the image is in; the grammar is not
    hang.release.set()
    outs = run_all(engine, [])
    last = outs["img"][-1]
    assert last.finish_reason == "stop" and last.prompt_tokens == len(ids) - 1 + rows.shape[0]
    text = AutoTokenizer.from_pretrained(vl_ckpt).decode(tokens_of(outs["img"]), skip_special_tokens=True)
    assert re.fullmatch(REGEX, text)
    engine.close()


# ----- sampling: logprobs, min_tokens, logit_bias ---------------------------------------------


def test_logprobs_of_a_constrained_row_have_no_mass_on_masked_tokens(engine, tokenizer):
    outs = run_all(engine, [constrained("lp", "regex", "[ab]{4}", 0, logprobs=20)])
    entries = [e for o in outs["lp"] for e in o.logprobs]
    assert len(entries) == len(tokens_of(outs["lp"]))
    first = entries[0]
    # The first token can only spell a or b runs: few tokens, and together all the mass.
    assert 2 <= len(first.top) < 20
    assert all(re.fullmatch("[ab]{1,4}", tokenizer.decode([t])) for t, _ in first.top)
    assert abs(sum(torch.tensor([lp for _, lp in first.top]).exp().tolist()) - 1) < 1e-4
    assert first.logprob == dict(first.top)[first.token_id]


def test_min_tokens_holds_the_end_back_unless_the_grammar_is_complete(engine, tokenizer):
    # [a-z]{1,30} may end after any letter, and a bias makes the end token the greedy pick there.
    eos_bias = [(t, 100.0) for t in sorted(engine.eos_ids)]
    early = constrained("early", "regex", "[a-z]{1,30}", None, logit_bias=eos_bias)
    assert len(finished(run_all(engine, [early])["early"], 120)) == 2  # one token, then the end
    held = constrained("held", "regex", "[a-z]{1,30}", None, logit_bias=eos_bias, min_tokens=3)
    ids = finished(run_all(engine, [held])["held"], 120)
    assert len(ids) == 4 and re.fullmatch("[a-z]{1,30}", tokenizer.decode(ids, skip_special_tokens=True))
    # [a-z]{3} is complete long before 20 tokens: then only the end token is left, and it is taken.
    outs = run_all(engine, [constrained("min-closed", "regex", "[a-z]{3}", 0, min_tokens=20)])
    ids = finished(outs["min-closed"], 120)
    assert ids[-1] in engine.eos_ids and re.fullmatch("[a-z]{3}", tokenizer.decode(ids, skip_special_tokens=True))


def test_logit_bias_moves_the_greedy_pick(engine):
    def first_tokens(rid: str, bias: list[tuple[int, float]]) -> list[int]:
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logit_bias=bias)
        return tokens_of(run_all(engine, [GenerateRequest(rid, PROMPT, params)])[rid])

    plain = first_tokens("nobias", [])
    favourite = next(t for t in range(100, 400) if t not in plain)
    assert first_tokens("up", [(favourite, 100.0)]) == [favourite] * 3
    assert first_tokens("down", [(plain[0], -100.0)])[0] != plain[0]


def test_logit_bias_and_constraint_kind_are_validated(engine):
    vocab = engine.config.text.vocab_size
    cases = {
        "id": SamplingParams(max_tokens=4, logit_bias=[(vocab, 1.0)]),
        "negative": SamplingParams(max_tokens=4, logit_bias=[(-1, 1.0)]),
        "range": SamplingParams(max_tokens=4, logit_bias=[(3, 100.5)]),
        "nan": SamplingParams(max_tokens=4, logit_bias=[(3, float("nan"))]),
        "shape": SamplingParams(max_tokens=4, logit_bias=[[3]]),
    }
    for name, params in cases.items():
        (out,) = engine.add_request(GenerateRequest(f"v-{name}", PROMPT, params))
        assert (out.error_status, out.error_code) == (400, "invalid_request") and "logit_bias" in out.error_message
    (out,) = engine.add_request(constrained("v-kind", "xml", "<a/>"))
    assert (out.error_status, out.error_code) == (400, "invalid_request") and "xml" in out.error_message
    assert not engine.has_work() and not engine.compiling


def test_sample_leaves_the_callers_logits_as_they_were(engine, tokenizer):
    """float() of float32 logits is the same tensor (a graph's output buffer, say): the mask, the
    bias and the min_tokens ban go to a copy."""
    from language_server.engine.request import EngineRequest
    from language_server.engine.sampler import sample

    vocab = engine.config.text.vocab_size
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=sorted(engine.eos_ids))
    compiled = xgr.GrammarCompiler(info).compile_regex("[a-z]{3}")
    req = EngineRequest(
        request=GenerateRequest(
            "s", PROMPT, SamplingParams(max_tokens=4, temperature=0.0, min_tokens=2, logit_bias=[(7, 5.0)])
        ),
        matcher=xgr.GrammarMatcher(compiled),
        min_tokens_banned=frozenset(engine.eos_ids),
    )
    logits = torch.randn(2, vocab)
    before = logits.clone()
    tokens, _ = sample(logits, [EngineRequest(request=GenerateRequest("u", PROMPT, SamplingParams(max_tokens=4))), req])
    assert torch.equal(logits, before)
    assert req.matcher.accept_token(tokens[1])  # the constrained row's pick obeyed its grammar


def test_the_engine_process_picks_up_a_compile_while_idle(tmp_path, ckpt, tokenizer):
    """Over the wire (a Constraint and logit_bias pairs through msgpack); with nothing else to
    run, the loop's idle poll brings a finished compile in at once, not on the next message."""
    from tests.test_engine_process import EngineHandle

    handle = EngineHandle(tmp_path, str(ckpt))
    try:
        assert isinstance(handle.recv(), EngineReady)
        for rid, regex in (("warm", "[a-z]{2}"), ("timed", REGEX)):  # the first also loads the compiler
            sent = time.monotonic()
            handle.send(constrained(rid, "regex", regex, 0, logit_bias=[(7, -3.0)]))
            outs = [handle.recv()]
            while not outs[-1].finished:
                outs.append(handle.recv())
        assert time.monotonic() - sent < 3
        assert re.fullmatch(REGEX, tokenizer.decode(finished(outs, 120), skip_special_tokens=True))
    finally:
        handle.close()
