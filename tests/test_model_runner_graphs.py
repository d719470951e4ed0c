"""The decode-graph path of the model runner on CPU: static buffers, bucketing, padding rows and
the eager fallbacks, run without capture ("nocapture") beside the normal path on the same
weights, step by step in lockstep from one scheduler. On a GPU the same path is captured; what
capture adds (fixed grids, no host reads) is covered by the interpreter test below and by
benchmarks/model_gpu.py."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from language_server.engine.block_manager import BlockManager
from language_server.engine.cuda_graphs import DecodeStep, bucket_sizes
from language_server.engine.model_runner import (
    ModelRunner,
    RunnerOptions,
    ScheduledChunk,
)
from language_server.engine.request import EngineRequest
from language_server.engine.scheduler import Scheduler
from language_server.engine.step_plan import decode_plan, encode_plan
from language_server.protocol import GenerateRequest, SamplingParams
from models.mrope import mrope_positions

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 4
NUM_BLOCKS = 200


def runner(ckpt, **options) -> ModelRunner:
    return ModelRunner(str(ckpt), "cpu", "float32", BLOCK, NUM_BLOCKS, 0.8, RunnerOptions(**options))


def make_request(rid: str, ids: list[int], max_tokens: int, config=None, grids=(), seed: int = 0) -> EngineRequest:
    """An EngineRequest as EngineCore leaves it when it is ready (images: random encoder rows)."""
    req = EngineRequest(request=GenerateRequest(rid, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)))
    req.token_ids, req.cache_tokens, req.num_prompt_tokens = list(ids), list(ids), len(ids)
    if config is not None and config.is_vl:
        req.positions, req.rope_delta = mrope_positions(
            ids, list(grids), config.image_token_id, config.vision.spatial_merge_size
        )
        if grids:
            is_image = torch.tensor(ids) == config.image_token_id
            width = config.text.hidden_size * (1 + config.vision.num_deepstack_levels)
            gen = torch.Generator().manual_seed(seed)
            req.attach_image_rows(torch.randn(int(is_image.sum()), width, generator=gen), config.image_token_id)
    return req


def lockstep(
    runners: list[ModelRunner], requests: list[EngineRequest], budget: int = 64, chunk: int = 16, max_seqs: int = 16
) -> list[list[torch.Tensor]]:
    """Run every runner on the same schedule (greedy from the first one); returns each step's logits."""
    sched = Scheduler(BlockManager(NUM_BLOCKS, BLOCK, enable_prefix_caching=False), budget, max_seqs, chunk)
    for req in requests:
        sched.add(req)
    steps = []
    while sched.has_work():
        chunks: list[ScheduledChunk] = sched.schedule()
        # Cloned: a graph step returns a view of its output buffer, which the next replay reuses.
        logits = [None if out is None else out.clone() for out in (r.execute(r.plan(chunks)) for r in runners)]
        steps.append(logits)
        sched.after_step(chunks)
        if logits[0] is None:
            continue
        for c, tok in zip([c for c in chunks if c.samples], logits[0].argmax(-1).tolist()):
            c.request.append_token(tok)
            if len(c.request.output_ids) >= c.request.request.sampling.max_tokens:
                sched.finish(c.request)
    return steps


def assert_same_logits(graph: torch.Tensor | None, normal: torch.Tensor | None) -> None:
    """Padding changes the row count of the per-expert matmuls, so fp32 sums may differ in the last
    bits (logits here are ~N(0, 6^2), so 1e-4 is ~1e-5 of their scale); the greedy tokens may not."""
    assert (graph is None) == (normal is None)
    if normal is not None:
        torch.testing.assert_close(graph, normal, rtol=1e-5, atol=1e-4)
        assert torch.equal(graph.argmax(-1), normal.argmax(-1))


def count_graph_runs(r: ModelRunner) -> list[int]:
    """Batch size of every step that went through the graph path."""
    sizes: list[int] = []
    original = r.decode_graphs.run

    def spy(step):
        sizes.append(len(step.token_ids))
        return original(step)

    r.decode_graphs.run = spy
    return sizes


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert bucket_sizes(256)[-3:] == [64, 128, 256]


def test_backends_are_chosen_by_name(qwen3_text_ckpt):
    with pytest.raises(ValueError, match="cuda_graphs='maybe'"):
        RunnerOptions(cuda_graphs="maybe")
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        runner(qwen3_text_ckpt, attention_backend="cuda")
    auto = runner(qwen3_text_ckpt)
    assert auto.kernels.describe() == "attention=torch moe=torch"  # auto on a CPU
    pytest.importorskip("triton")
    named = runner(qwen3_text_ckpt, attention_backend="triton", moe_backend="triton")
    assert named.kernels.describe() == "attention=triton moe=triton" and named.kernels.graph_capturable


def test_cpu_default_has_no_graphs(qwen3_text_ckpt):
    assert runner(qwen3_text_ckpt).decode_graphs is None


def test_text_graph_path_equals_normal_path(qwen3_text_ckpt):
    """Batches from 1 to 7 sequences (padded to buckets 1, 2, 4, 8), prompts chunked."""
    normal, graphs = (
        runner(qwen3_text_ckpt, cuda_graphs="off"),
        runner(qwen3_text_ckpt, cuda_graphs="nocapture", max_num_seqs=8, max_model_len=64),
    )
    sizes = count_graph_runs(graphs)
    rng = random.Random(0)
    reqs = [
        make_request(f"t{i}", [rng.randrange(1, 400) for _ in range(rng.randrange(2, 30))], rng.randrange(2, 14))
        for i in range(7)
    ]
    steps = lockstep([normal, graphs], reqs)
    for a, b in steps:
        assert_same_logits(b, a)
    assert len(sizes) > 10 and len(set(sizes)) >= 3 and set(sizes) - {1, 2, 4, 8}  # padded buckets replayed
    # Padding rows wrote only to the scratch block: every real cache block is the same.
    torch.testing.assert_close(
        graphs.kv_cache.data[:, :, :NUM_BLOCKS], normal.kv_cache.data[:, :, :NUM_BLOCKS], rtol=1e-5, atol=1e-4
    )


def test_unpadded_graph_step_is_bit_exact(qwen3_text_ckpt):
    normal, graphs = runner(qwen3_text_ckpt, cuda_graphs="off"), runner(qwen3_text_ckpt, cuda_graphs="nocapture")
    rng = random.Random(1)
    reqs = [make_request(f"u{i}", [rng.randrange(1, 400) for _ in range(9)], 6) for i in range(4)]
    for a, b in lockstep([normal, graphs], reqs):
        assert torch.equal(a, b)


def test_vl_images_and_mrope_positions(vl_ckpt):
    """Image prompts prefill eagerly; their decodes replay with M-RoPE positions shifted by delta."""
    normal, graphs = runner(vl_ckpt, cuda_graphs="off"), runner(vl_ckpt, cuda_graphs="nocapture", max_num_seqs=4)
    sizes = count_graph_runs(graphs)
    cfg = normal.config
    img, start, end = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    reqs = [
        make_request("img", [5, 6, start] + [img] * 6 + [end, 7], 8, cfg, [(1, 4, 6)], seed=1),
        make_request(
            "two", [start] + [img] * 4 + [end, 9, start] + [img] * 2 + [end], 6, cfg, [(1, 4, 4), (1, 2, 4)], seed=2
        ),
        make_request("text", [11, 12, 13], 9, cfg),
    ]
    assert reqs[0].rope_delta != 0
    steps = lockstep([normal, graphs], reqs, budget=8, chunk=5)
    for a, b in steps:
        assert_same_logits(b, a)
    assert sizes and max(sizes) == 3


def test_generated_image_token_beside_an_image_prefill(vl_ckpt):
    """A generated token that happens to be the image token id (random weights emit it) takes no
    encoder row. Decoded in the same step as another request's image prefill, it once made the
    batch one row short ("N image tokens in the batch but N-1 vision rows") and failed the step
    for every request in it. Each row's logits must equal its request run alone."""
    r = runner(vl_ckpt, cuda_graphs="off")
    cfg = r.config
    img, start, end = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id

    def requests():
        image = make_request("img", [5, 6, start] + [img] * 6 + [end, 7], 4, cfg, [(1, 4, 6)], seed=1)
        # "echo" already generated the image token id once (prefilled and decoded it alone before).
        echo = make_request("echo", [start] + [img] * 4 + [end, 9], 4, cfg, [(1, 4, 4)], seed=2)
        text = make_request("text", [11, 12, 13], 4, cfg)
        for req in (echo, text):
            req.append_token(img)
        return image, echo, text

    def logits(chunks_of) -> list[torch.Tensor]:
        sched = Scheduler(BlockManager(NUM_BLOCKS, BLOCK, enable_prefix_caching=False), 64, 16, 64)
        reqs = chunks_of()
        for req in reqs:
            sched.add(req)
        chunks = sched.schedule()  # whole sequences: the generated token is in each chunk
        assert [c.count for c in chunks] == [req.num_tokens for req in reqs]
        return list(r.execute(r.plan(chunks)))

    together = logits(requests)
    alone = [logits(lambda i=i: [requests()[i]])[0] for i in range(3)]
    for batched, solo in zip(together, alone):
        torch.testing.assert_close(batched, solo, rtol=1e-5, atol=1e-4)


def test_eager_fallbacks(qwen3_text_ckpt):
    """More sequences than the largest bucket, or a sequence past max_model_len: the eager path."""
    normal = runner(qwen3_text_ckpt, cuda_graphs="off")
    graphs = runner(qwen3_text_ckpt, cuda_graphs="nocapture", max_num_seqs=2, max_model_len=16)
    sizes = count_graph_runs(graphs)
    rng = random.Random(2)
    reqs = [make_request(f"f{i}", [rng.randrange(1, 400) for _ in range(10)], 12) for i in range(3)]
    reqs[2].request.sampling.max_tokens = 2  # finishes early: the last steps have 2 sequences
    for a, b in lockstep([normal, graphs], reqs):
        assert_same_logits(b, a)
    # Decodes with 3 sequences or a context over 16 tokens never took the graph path.
    assert sizes and set(sizes) == {2}
    assert len(sizes) == len(range(11, 16))  # two sequences left, computing tokens 11..15 (<= 16 keys)


INTERPRETER_SCRIPT = """
import random, sys, torch
sys.path.insert(0, {tests!r})
from test_model_runner_graphs import lockstep, make_request, runner
from models.kernels import availability
assert availability.INTERPRET
normal = runner({ckpt!r}, cuda_graphs="off")
# max_model_len 1024: the graph plan splits the context into 256-token pieces, most of them empty.
graphs = runner({ckpt!r}, cuda_graphs="nocapture", attention_backend="triton", max_num_seqs=4, max_model_len=1024)
rng = random.Random(3)
reqs = [make_request("long", [rng.randrange(1, 400) for _ in range(254)], 5),
        make_request("short", [rng.randrange(1, 400) for _ in range(7)], 4)]
worst = 0.0
for a, b in lockstep([normal, graphs], reqs, budget=300, chunk=300):
    if a is not None:
        worst = max(worst, (a - b).abs().max().item())
assert worst < 1e-4, worst
print("interpreted graph path ok", worst)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter check; GPUs run the compiled kernel")
def test_graph_split_plan_under_triton_interpreter(qwen3_text_ckpt):
    """The Triton decode kernel (interpreted) with the graphs' fixed split plan: contexts that cross
    a split boundary, empty splits, padding rows."""
    pytest.importorskip("triton")
    script = INTERPRETER_SCRIPT.format(tests=str(ROOT / "tests"), ckpt=str(qwen3_text_ckpt))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interpreted graph path ok" in done.stdout


def test_capture_and_replay_bookkeeping_with_a_stand_in_for_cuda(monkeypatch, qwen3_text_ckpt):
    """The capture=True branch on the CPU, with torch.cuda's graph API replaced by a stand-in whose
    replay re-runs the captured forward into the captured output tensor: every bucket captured
    largest first on one pool, replays read the static buffers, capture touches no real block."""
    from language_server.engine import cuda_graphs

    captured: list[tuple] = []
    original_forward = cuda_graphs.DecodeGraphRunner._forward

    def recording_forward(self, size, attn_batch):
        out = original_forward(self, size, attn_batch)
        captured.append((self, size, attn_batch, out))
        return out

    pools = []

    class StandInGraph:
        def pool(self):
            return ("pool", id(self))

        def replay(self):  # the captured batch: a replay sees only what the static buffers hold
            self.out.copy_(original_forward(self.runner, self.size, self.batch))

    @contextlib.contextmanager
    def capture(graph, pool=None):
        pools.append(pool)
        yield
        graph.runner, graph.size, graph.batch, graph.out = captured[-1]

    monkeypatch.setattr(cuda_graphs.DecodeGraphRunner, "_forward", recording_forward)
    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    for name, value in dict(
        CUDAGraph=StandInGraph,
        graph=capture,
        Stream=lambda device: stream,
        stream=lambda s: contextlib.nullcontext(),
        synchronize=lambda device=None: None,
        current_stream=lambda device=None: stream,
    ).items():
        monkeypatch.setattr(torch.cuda, name, value)
    normal = runner(qwen3_text_ckpt, cuda_graphs="off")
    # The triton backend (its torch fallbacks on a CPU): a captured step may read device buffers only.
    graphs_runner = runner(qwen3_text_ckpt, cuda_graphs="nocapture", attention_backend="triton")
    before = graphs_runner.kv_cache.data.clone()
    graphs_runner.decode_graphs = cuda_graphs.DecodeGraphRunner(
        graphs_runner.model,
        graphs_runner.kernels,
        max_batch=8,
        max_blocks=16,
        scratch_block=NUM_BLOCKS,
        mrope=False,
        capture=True,
    )
    g = graphs_runner.decode_graphs
    assert sorted(g.graphs) == [1, 2, 4, 8] and [size for _, size, _, _ in captured[1::2]] == [8, 4, 2, 1]
    assert pools[0] is None and pools[1:] == [p.pool() for p in (g.graphs[8], g.graphs[4], g.graphs[2])]
    assert torch.equal(graphs_runner.kv_cache.data[:, :, :NUM_BLOCKS], before[:, :, :NUM_BLOCKS])
    sizes = count_graph_runs(graphs_runner)
    rng = random.Random(4)
    reqs = [
        make_request(f"c{i}", [rng.randrange(1, 400) for _ in range(rng.randrange(3, 20))], 5 + i) for i in range(5)
    ]
    for a, b in lockstep([normal, graphs_runner], reqs):
        assert_same_logits(b, a)
    assert sizes and set(sizes) >= {5, 1}


class OverTheWire:
    """A runner that executes each plan as the other ranks get it: encoded to bytes and decoded,
    the encoder rows handed over apart from the bytes (ranks.py broadcasts them)."""

    def __init__(self, inner: ModelRunner) -> None:
        self.inner = inner
        self.sent = {"graph": 0, "eager": 0, "rows": 0}

    def plan(self, chunks):
        return self.inner.plan(chunks)

    def execute(self, plan):
        received, rows_shape = decode_plan(encode_plan(plan))
        if isinstance(plan.step, DecodeStep):
            self.sent["graph"] += 1
        else:
            self.sent["eager"] += 1
            assert rows_shape == (None if plan.step.image_rows is None else list(plan.step.image_rows.shape))
            if rows_shape is not None:
                self.sent["rows"] += 1
                received.step.image_rows = plan.step.image_rows.clone()
        return self.inner.execute(received)


def test_a_plan_sent_as_bytes_runs_the_same(vl_ckpt):
    """Eager steps with images and graph-path decodes, decoded from their bytes, give bit-equal logits."""
    local = runner(vl_ckpt, cuda_graphs="nocapture", max_num_seqs=4)
    wire = OverTheWire(runner(vl_ckpt, cuda_graphs="nocapture", max_num_seqs=4))
    cfg = local.config
    img, start, end = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    reqs = [
        make_request("img", [5, 6, start] + [img] * 6 + [end, 7], 6, cfg, [(1, 4, 6)], seed=1),
        make_request("text", [11, 12, 13], 7, cfg),
    ]
    for a, b in lockstep([local, wire], reqs, budget=8, chunk=5):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
    assert all(wire.sent.values()), wire.sent
