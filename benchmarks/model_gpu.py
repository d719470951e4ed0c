"""The whole language model on one GPU, through the engine, beside transformers on the same weights.

    python benchmarks/model_gpu.py               # = splitvl bench model: all 48 layers (H200: ~4 min)
    python benchmarks/model_gpu.py --quick       # fewer generated tokens (~2-3 min)
    python benchmarks/model_gpu.py --layers 8    # fewer layers (an H100 with room to spare)
    python benchmarks/model_gpu.py --cpu-smoke   # tiny shapes on the CPU, torch paths: checks this script
    python benchmarks/model_gpu.py --tensor-parallel-size 2 [--expert-parallel]   # ranks on GPUs 0-1

Nothing is downloaded or written but a config and a tokenizer: the Qwen3-VL-30B-A3B language
model is built on the GPU with random bf16 weights of the right scale (ModelRunner's
load_format "dummy"), and transformers' Qwen3VLMoeForConditionalGeneration is built on the same
parameter tensors (shared, not copied). With --tensor-parallel-size N the engine runs N ranks,
one GPU each (language_server/engine/ranks.py); transformers, which holds the whole model on one
GPU, is then left out (its baseline is a TP=1 run's), and the floor is per rank: each reads 1/N
of the weights and its share of the KV cache, at one GPU's copy bandwidth (the all-reduces are
what the figure adds over it).

Sections, each of which prints its error and lets the others run:
  1. ceilings: device-to-device copy bandwidth (read + write) and the bf16 matmul rate
  2. engine decode: tok/s at each batch (random prompts, greedy, ignore_eos) over the steps where
     the whole batch decodes; CUDA graphs on, then off, same prompts (their tokens are compared)
  3. engine prefill: time to first token of one 1k and one 8k prompt
  4. transformers generate on the same weights: decode tok/s at batch 1 and 16 (from the time of
     N new tokens minus the time of 1), prefill (generate of 1 token) at 1k
  5. table: ours, transformers, ratio, and the share of the floor, where the floor is
     max(bytes / copy bandwidth, flops / matmul rate); decode bytes = every weight a step reads
     (attention, router, lm_head, the experts that random top-k routing activates:
     E * (1 - (1 - K/E)^B) per layer) + the KV cache at the mean context.
Full numbers go to $OUT/model_gpu.json (or --out) after every section.

Legend: B batch, T prompt tokens, L layers, E experts, K experts per token, H hidden, I expert
intermediate, V vocab.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from language_server.engine.core import EngineCore
from language_server.protocol import GenerateRequest, SamplingParams
from language_server.settings import LanguageSettings
from models import tiny_tokenizer
from models.config import ModelConfig, load_config
from models.tiny_checkpoint import write_tiny_checkpoint

BLOCK = 16


@dataclass(frozen=True)
class Plan:
    device: str
    dtype: str
    shapes: str  # models.tiny_checkpoint shapes preset
    layers: int | None  # None: the preset's
    batches: tuple[int, ...]
    input_len: int
    output_len: int
    prefill_lens: tuple[int, ...]
    hf_batches: tuple[int, ...]
    hf_new_tokens: int
    copy_mib: int
    matmul_n: int
    tensor_parallel_size: int = 1
    expert_parallel: bool = False
    fp8: bool = False  # also an engine on the FP8 checkpoint layout, beside bf16


def make_plan(args: argparse.Namespace) -> Plan:
    ranks = {
        "tensor_parallel_size": args.tensor_parallel_size,
        "expert_parallel": args.expert_parallel,
        "fp8": args.fp8,
    }
    if args.cpu_smoke:
        # Batch 3 pads to the graph bucket 4 (the graph path runs uncaptured on the CPU).
        return Plan("cpu", "float32", "tiny", args.layers, (1, 3, 4), 12, 8, (32, 64), (1, 2), 8, 16, 256, **ranks)
    return Plan(
        "cuda",
        "bfloat16",
        "qwen3-vl-30b-a3b",
        args.layers,
        (1, 16, 64, 256),
        512,
        64 if args.quick else 256,
        (1024, 8192),
        (1, 16),
        16 if args.quick else 64,
        1024,
        8192,
        **ranks,
    )


# ----- timing ---------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str, reps: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_ceilings(plan: Plan) -> dict:
    """Copy bandwidth (bytes read + written per second) and the matmul rate, both on random data."""
    dt = getattr(torch, plan.dtype)
    src = torch.randn(plan.copy_mib * 2**20 // dt.itemsize, device=plan.device, dtype=dt)
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src), plan.device, 20)
    n = plan.matmul_n
    a, b = torch.randn(n, n, device=plan.device, dtype=dt), torch.randn(n, n, device=plan.device, dtype=dt)
    mm_s = median_seconds(lambda: a @ b, plan.device, 10)
    return {"copy_bytes_per_s": 2 * src.numel() * dt.itemsize / copy_s, "matmul_flops_per_s": 2 * n**3 / mm_s}


# ----- floors ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSizes:
    """Byte and parameter counts of the language model, from its config (built on meta)."""

    total_params: int
    dense_params: int  # everything but the experts and the embedding table: read by every step
    expert_params: int  # one expert's gate, up and down
    layers: int
    experts: int
    top_k: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    itemsize: int
    ranks: int = 1  # tensor-parallel ranks: the byte counts below are one rank's
    fp8_dense_params: int = 0  # of dense_params, those stored FP8 (1 byte; the attention projections)
    fp8_experts: bool = False  # experts stored FP8

    @classmethod
    def of(cls, config: ModelConfig, dtype: torch.dtype, ranks: int = 1, fp8: bool = False) -> ModelSizes:
        """`fp8`: the FP8 checkpoint's layout (models/fp8_layers.py): attention and experts at
        one byte a weight (their fp32 block scales, 1/16384 of it, left out)."""
        from models.fp8_layers import FP8_MODULES
        from models.qwen3_moe import Qwen3MoeForCausalLMWithDeepStack

        text = config.text
        with torch.device("meta"):
            model = Qwen3MoeForCausalLMWithDeepStack(text)
        total = sum(p.numel() for p in model.parameters())
        experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        embed = model.model.embed_tokens.weight.numel()
        quantized_dense = sum(
            p.numel()
            for n, p in model.named_parameters()
            if ".experts." not in n and FP8_MODULES.search("." + n.rsplit(".", 1)[0])
        )
        return cls(
            total,
            total - experts - embed,
            3 * text.hidden_size * text.moe_intermediate_size,
            text.num_hidden_layers,
            text.num_experts,
            text.num_experts_per_tok,
            text.hidden_size,
            text.num_attention_heads,
            text.num_key_value_heads,
            text.head_dim,
            dtype.itemsize,
            ranks,
            quantized_dense if fp8 else 0,
            fp8,
        )

    def dense_bytes(self) -> float:
        return (self.dense_params - self.fp8_dense_params) * self.itemsize + self.fp8_dense_params

    def expert_bytes(self) -> float:
        return self.expert_params * (1 if self.fp8_experts else self.itemsize)

    def weight_bytes(self) -> float:
        """The whole model's weights on one rank (the embedding table included)."""
        embed = self.total_params - self.dense_params - self.layers * self.experts * self.expert_params
        return (
            embed * self.itemsize + self.dense_bytes() + self.layers * self.experts * self.expert_bytes()
        ) / self.ranks

    def kv_bytes_per_token(self) -> int:
        """One rank's: its share of the KV heads, or the one head it replicates."""
        local_heads = self.kv_heads // self.ranks if self.kv_heads % self.ranks == 0 else 1
        return 2 * self.layers * local_heads * self.head_dim * self.itemsize

    def active_experts(self, tokens: int) -> float:
        """Expected distinct experts per layer for `tokens` independent random top-k picks."""
        return self.experts * (1 - (1 - self.top_k / self.experts) ** tokens)

    def decode_step_bytes(self, batch: int, mean_context: float) -> float:
        """Bytes one rank reads in a decode step (norms and the router, replicated, are negligible)."""
        weights = (self.dense_bytes() + self.layers * self.active_experts(batch) * self.expert_bytes()) / self.ranks
        return weights + batch * (mean_context * self.kv_bytes_per_token() + self.hidden * self.itemsize)

    def prefill_floor_s(self, tokens: int, ceilings: dict) -> float:
        active = self.dense_params + self.layers * self.top_k * self.expert_params  # per token (lm_head: 1 row)
        flops = 2 * tokens * active + 2 * self.layers * tokens**2 * self.q_heads * self.head_dim  # causal QK, PV
        flops /= self.ranks
        weight_bytes = (
            self.dense_bytes() + self.layers * self.active_experts(tokens) * self.expert_bytes()
        ) / self.ranks
        return max(flops / ceilings["matmul_flops_per_s"], weight_bytes / ceilings["copy_bytes_per_s"])


# ----- the engine -----------------------------------------------------------------------------


def kv_blocks(plan: Plan, sizes: ModelSizes) -> int:
    """Blocks for the largest decode batch at full length plus one longest prefill, capped by memory."""
    need = max(plan.batches) * -(-(plan.input_len + plan.output_len) // BLOCK) + -(
        -(max(plan.prefill_lens) + 1) // BLOCK
    )
    if plan.device != "cuda":
        return need
    torch.cuda.empty_cache()  # the ceilings' buffers
    free, _ = torch.cuda.mem_get_info()
    headroom = 4 << 30  # graph pools, prefill activations, the sampler's fp32 logits
    per_block = BLOCK * sizes.kv_bytes_per_token()
    fits = int((free - sizes.weight_bytes() - headroom) // per_block)
    if fits < need:
        print(f"  KV cache capped at {fits} blocks (wanted {need}): the largest batch may be preempted")
    return max(1, min(need, fits))


def build_engine(ckpt: Path, plan: Plan, num_kv_blocks: int, graphs: bool = True) -> EngineCore:
    """The engine as a user configures it: random weights at the real shapes (load_format dummy);
    with graphs on the CPU the graph path runs uncaptured, so the smoke run still goes through its
    buffers."""
    longest = max(max(plan.prefill_lens), plan.input_len + plan.output_len)
    settings = LanguageSettings(
        model=str(ckpt),
        device=plan.device,
        dtype=plan.dtype,
        block_size=BLOCK,
        num_kv_blocks=num_kv_blocks,
        max_num_seqs=max(plan.batches),
        max_num_batched_tokens=max(plan.prefill_lens),
        chunk_size=max(plan.prefill_lens),
        max_model_len=longest + 64,
        enable_prefix_caching=False,
        load_format="dummy",
        cuda_graphs=("on" if plan.device == "cuda" else "nocapture") if graphs else "off",
        tensor_parallel_size=plan.tensor_parallel_size,
        expert_parallel=plan.expert_parallel,
    )
    return EngineCore(settings)


SPECIAL_IDS = frozenset(tiny_tokenizer.token_ids().values())  # image placeholders and the like


def wide_tokenizer(ckpt: Path, tokenizer_json: Path) -> int:
    """Put a large byte-level BPE vocabulary in a benchmark checkpoint, Qwen's added tokens after
    it at their real ids, so text, detokenizing and grammar masks see a vocabulary of Qwen's size
    (the tiny tokenizer covers 448 of the model's 151,936 ids). The special ids the checkpoint's
    files name (image token, EOS, ...) move with their tokens. Returns the base vocabulary size."""
    from tokenizers import AddedToken, Tokenizer

    from models import tiny_tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    base = tok.get_vocab_size(with_added_tokens=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tiny_tokenizer.SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tiny_tokenizer.ADDED_TOKENS])
    tok.save(str(ckpt / "tokenizer.json"))
    moved = {old: tok.token_to_id(text) for text, old in tiny_tokenizer.token_ids().items()}

    def remap(value: object, key: str = "") -> object:
        if isinstance(value, dict):
            return {k: remap(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [remap(v, key) for v in value]
        if isinstance(value, int) and not isinstance(value, bool) and key.endswith(("token_id", "token_ids")):
            return moved.get(value, value)
        return value

    for name in ("config.json", "generation_config.json"):
        path = ckpt / name
        if path.is_file():
            path.write_text(json.dumps(remap(json.loads(path.read_text())), indent=2))
    config_path = ckpt / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["added_tokens_decoder"] = {
        str(moved.get(int(k), int(k))): v for k, v in tok_config.get("added_tokens_decoder", {}).items()
    }
    config_path.write_text(json.dumps(tok_config, indent=2))
    return base


def random_prompt(rng: random.Random, length: int, vocab: int) -> list[int]:
    """Random ordinary tokens (a stray image placeholder would make the engine expect an image)."""
    ids: list[int] = []
    while len(ids) < length:
        tok = rng.randrange(1, vocab)
        if tok not in SPECIAL_IDS:
            ids.append(tok)
    return ids


def submit(engine: EngineCore, requests: list[GenerateRequest]) -> None:
    for req in requests:
        errors = engine.add_request(req)
        if errors:
            raise RuntimeError(f"{req.request_id} refused: {errors[0].error_message}")


def decode_run(engine: EngineCore, batch: int, plan: Plan) -> dict:
    """Tok/s over the steps where all `batch` sequences decode (prefill and the tail excluded)."""
    graphs = engine.runner.decode_graphs is not None
    rng = random.Random(batch)  # the same prompts with graphs on and off
    vocab = engine.config.text.vocab_size
    params = SamplingParams(max_tokens=plan.output_len, temperature=0.0, ignore_eos=True)
    reqs = [
        GenerateRequest(f"b{batch}-{'g' if graphs else 'e'}-{i}", random_prompt(rng, plan.input_len, vocab), params)
        for i in range(batch)
    ]
    preempted = engine.scheduler.preemptions
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    step_s: list[float] = []
    sched = engine.scheduler
    try:
        submit(engine, reqs)
        while engine.has_work():
            full = (
                not sched.waiting
                and len(sched.running) == batch
                and all(r.num_tokens - r.num_computed == 1 for r in sched.running)
            )
            t0 = time.perf_counter()
            outs = engine.step()  # ends in the sampler's device sync
            elapsed = time.perf_counter() - t0
            for out in outs:
                tokens[out.request_id].extend(out.new_token_ids)
            if full:
                step_s.append(elapsed)
    finally:  # a failed run leaves nothing behind for the next one
        for r in reqs:
            engine.abort(r.request_id)
    steady = step_s[3:] or step_s  # the first replays still warm caches up
    last = [t[-1] for t in tokens.values() if t]
    return {
        "batch": batch,
        "graphs": graphs,
        "decode_steps": len(steady),
        "step_ms_median": 1e3 * statistics.median(steady),
        "tok_s": batch * len(steady) / sum(steady),
        "preemptions": engine.scheduler.preemptions - preempted,
        "distinct_last_tokens": len(set(last)),
        # Runs of the same plan are compared by this (a TP=2 run with a TP=1 one, say).
        "generated_sha1": hashlib.sha1(json.dumps([tokens[r.request_id] for r in reqs]).encode()).hexdigest(),
        "generated": [tokens[r.request_id] for r in reqs],
        "prompt0": reqs[0].prompt_token_ids,
    }


def prefill_run(engine: EngineCore, length: int, reps: int) -> dict:
    """Time to first token of one prompt of `length` tokens (median of `reps`, after a warm-up)."""
    rng = random.Random(length)
    vocab = engine.config.text.vocab_size
    times = []
    for rep in range(reps + 1):
        req = GenerateRequest(
            f"p{length}-{rep}",
            random_prompt(rng, length, vocab),
            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
        )
        t0 = time.perf_counter()
        submit(engine, [req])
        while engine.has_work():
            engine.step()
        if rep:
            times.append(time.perf_counter() - t0)
    return {"tokens": length, "ms": 1e3 * statistics.median(times), "reps": reps}


# ----- transformers on the same weights ---------------------------------------------------------


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get meta parameters (no memory, no init) but real buffers (rotary
    tables): their weights come from our model afterwards."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def transformers_model(ours: nn.Module, ckpt: Path, device: str, dtype: torch.dtype) -> nn.Module:
    """Qwen3VLMoeForConditionalGeneration whose language weights ARE ours (shared tensors); its
    unused vision tower is zeros."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(ckpt)
    with parameters_on_meta():
        hf = transformers.Qwen3VLMoeForConditionalGeneration(config)
    mine = dict(ours.named_parameters())
    for name, param in list(hf.named_parameters()):
        owner, leaf = name.rsplit(".", 1)
        if name.startswith("model.language_model."):
            src = mine["model." + name[len("model.language_model.") :]]
        elif name == "lm_head.weight":
            src = mine[name]
        else:
            src = nn.Parameter(torch.zeros(param.shape, dtype=dtype, device=device), requires_grad=False)
        if src.shape != param.shape:
            raise ValueError(f"{name}: transformers has {tuple(param.shape)}, we have {tuple(src.shape)}")
        setattr(hf.get_submodule(owner), leaf, src)
    return hf.to(device).eval()  # moves the buffers; the parameters are already there


def hf_generate(hf: nn.Module, ids: torch.Tensor, new_tokens: int, device: str) -> tuple[torch.Tensor, float]:
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    if "mm_token_type_ids" in inspect.signature(hf.forward).parameters:
        kwargs["mm_token_type_ids"] = torch.zeros_like(ids)  # all text
    sync(device)
    t0 = time.perf_counter()
    out = hf.generate(**kwargs)
    sync(device)
    return out[:, ids.shape[1] :], time.perf_counter() - t0


def transformers_runs(
    hf: nn.Module, plan: Plan, vocab: int, prompt0: list[int] | None, result: dict, ours: nn.Module | None = None
) -> None:
    """Fills result["prefill"] and result["decode"] as it goes (a failure keeps what was measured)."""
    dev = plan.device
    rng = random.Random(7)
    prefill_len = min(plan.prefill_lens)
    ids = torch.tensor([random_prompt(rng, prefill_len, vocab)], device=dev)
    hf_generate(hf, ids, 1, dev)  # warm-up
    ms = 1e3 * statistics.median(hf_generate(hf, ids, 1, dev)[1] for _ in range(3))
    result["prefill"].append({"tokens": prefill_len, "ms": ms})
    print(f"  transformers prefill T={prefill_len}: {ms:.1f} ms")
    n = plan.hf_new_tokens
    for batch in plan.hf_batches:
        rows = [random_prompt(rng, plan.input_len, vocab) for _ in range(batch)]
        if batch == 1 and prompt0 is not None:
            rows = [prompt0]  # our batch-1 prompt: the greedy tokens can be compared
        ids = torch.tensor(rows, device=dev)
        hf_generate(hf, ids, 2, dev)  # warm-up
        one = statistics.median(hf_generate(hf, ids, 1, dev)[1] for _ in range(2))
        new, many = hf_generate(hf, ids, n, dev)
        step = (many - one) / (n - 1)
        result["decode"].append(
            {"batch": batch, "step_ms": 1e3 * step, "tok_s": batch / step, "tokens0": new[0].tolist()}
        )
        print(f"  transformers decode B={batch}: {1e3 * step:.1f} ms/step, {batch / step:.1f} tok/s")
        if batch == 1 and ours is not None:
            result["teacher_forced"] = teacher_forced(ours, hf, rows[0], new[0].tolist(), dev)
            tf = result["teacher_forced"]
            print(
                f"  teacher-forced over transformers' {tf['positions']} greedy tokens: ours picks the same token at "
                f"{tf['top1_agree']:.0%} of positions, logits rel. error {tf['logits_rel_err']:.2e} (our model on "
                f"the torch reference ops: {tf['reference_ops_top1_agree']:.0%}, {tf['reference_ops_logits_rel_err']:.2e})"
            )


@torch.no_grad()
def teacher_forced(ours: nn.Module, hf: nn.Module, prompt: list[int], generated: list[int], device: str) -> dict:
    """Both models read the same sequence (the prompt, then transformers' own greedy tokens), so
    one rounding flip cannot derail the rest: at each generated position, does our argmax equal
    transformers' token, and how far apart are the logits? A robust check of the GPU path
    against transformers where free-running greedy comparison diverges after the first flip."""
    from models.backends import select_kernels, torch_kernels
    from models.forward_context import prefill_context

    seq = prompt + generated[:-1]
    n = len(generated)
    ids = torch.tensor(seq, device=device)
    served = select_kernels("auto", "auto", None, torch.device(device))
    mine = ours.compute_logits(ours(ids, prefill_context(served, [len(seq)], device))[-n:]).float()
    # The same model on the torch reference kernels (transformers' arithmetic, in bf16): how far
    # bf16 alone puts us from transformers, to judge the kernels' distance by.
    plain = ours.compute_logits(ours(ids, prefill_context(torch_kernels(), [len(seq)], device))[-n:]).float()
    kwargs = {"input_ids": ids[None]}
    if "mm_token_type_ids" in inspect.signature(hf.forward).parameters:
        kwargs["mm_token_type_ids"] = torch.zeros_like(ids[None])
    theirs = hf(**kwargs).logits[0, -n:].float()
    want = torch.tensor(generated, device=device)

    def agree(logits: torch.Tensor) -> float:
        return (logits.argmax(-1) == want).float().mean().item()

    def rel(logits: torch.Tensor) -> float:
        return ((logits - theirs).norm() / theirs.norm()).item()

    return {
        "positions": n,
        "top1_agree": agree(mine),
        "hf_top1_self": agree(theirs),
        "logits_rel_err": rel(mine),
        "reference_ops_top1_agree": agree(plain),
        "reference_ops_logits_rel_err": rel(plain),
    }


# ----- the run ----------------------------------------------------------------------------------


class Report:
    """Sections that fail print their traceback and leave the others running; JSON after each."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path = path
        self.deadline = time.monotonic() + budget_s
        self.data: dict = {"errors": {}, "skipped": []}

    @contextmanager
    def section(self, name: str, reserve_s: float = 0.0) -> Iterator[bool]:
        """Runs the body unless the time budget, less `reserve_s` kept for later sections, is spent."""
        if time.monotonic() > self.deadline - reserve_s:
            print(f"\n== {name}: skipped (time budget spent)")
            self.data["skipped"].append(name)
            yield False
            return
        print(f"\n== {name}", flush=True)
        t0 = time.monotonic()
        try:
            yield True
        except Exception as exc:  # one broken section must not cost the others
            traceback.print_exc()
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}"
        print(f"   ({time.monotonic() - t0:.1f} s)", flush=True)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(_without_bulk(self.data), indent=1, default=str))


BULKY = ("generated", "prompt0")  # every generated token: compared in memory, not worth the JSON


def _without_bulk(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without_bulk(v) for k, v in value.items() if k not in BULKY}
    if isinstance(value, list):
        return [_without_bulk(v) for v in value]
    return value


def decode_sections(
    report: Report, engine: EngineCore | None, plan: Plan, graphs: bool, reserve_s: float = 0.0
) -> None:
    for batch in plan.batches:
        with report.section(f"engine decode B={batch} graphs={'on' if graphs else 'off'}", reserve_s) as go:
            if go and engine is not None:
                row = decode_run(engine, batch, plan)
                report.data["decode"].append(row)
                print(
                    f"  {row['step_ms_median']:.2f} ms/step, {row['tok_s']:.1f} tok/s over {row['decode_steps']} "
                    f"steps; {row['distinct_last_tokens']} distinct last tokens; {row['preemptions']} preemptions"
                )


FP8_BATCHES = (1, 16, 64)


def fp8_sections(report: Report, plan: Plan, config: ModelConfig, dtype: torch.dtype) -> None:
    """The same engine on the FP8 checkpoint layout (random weights quantized as Qwen's FP8
    releases are: attention and experts FP8 with 128x128 block scales): decode at B = 1, 16, 64
    and prefill 1k, its weight bytes, and how many tokens of KV cache the memory left holds."""
    data = report.data
    fp8_ckpt = Path(tempfile.mkdtemp(prefix="splitvl-bench-fp8-"))
    write_tiny_checkpoint(fp8_ckpt, shapes=plan.shapes, num_layers=plan.layers, metadata_only=True, quantize_fp8=True)
    sizes = ModelSizes.of(config, dtype, plan.tensor_parallel_size, fp8=True)
    fp8 = data["fp8"] = {"decode": [], "prefill": []}
    engine = None
    with report.section("engine build, FP8 weights") as go:
        if go:
            engine = build_engine(fp8_ckpt, plan, kv_blocks(plan, sizes))
            model = engine.runner.model
            fp8["weights"] = engine.runner.weights
            fp8["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
            print(f"  weights {engine.runner.weights}: {fp8['weight_bytes'] / 2**30:.2f} GiB")
    for batch in [b for b in plan.batches if b in FP8_BATCHES] or plan.batches[:1]:
        with report.section(f"FP8 engine decode B={batch}") as go:
            if go and engine is not None:
                row = decode_run(engine, batch, plan)
                fp8["decode"].append(row)
                print(
                    f"  {row['step_ms_median']:.2f} ms/step, {row['tok_s']:.1f} tok/s over {row['decode_steps']} steps"
                )
    with report.section("FP8 engine prefill") as go:
        if go and engine is not None:
            row = prefill_run(engine, min(plan.prefill_lens), reps=3)
            fp8["prefill"].append(row)
            print(f"  T={row['tokens']}: {row['ms']:.1f} ms to the first token")
    if engine is not None:
        close_engine(engine, plan)
    shutil.rmtree(fp8_ckpt, ignore_errors=True)


def fp8_summary(data: dict, sizes: ModelSizes, config: ModelConfig, dtype: torch.dtype, plan: Plan) -> None:
    """FP8 beside bf16: decode and prefill, against the FP8 floor; weights and KV capacity."""
    fp8 = data.get("fp8")
    ceilings = data.get("ceilings")
    if not fp8 or not ceilings:
        return
    fp8_sizes = ModelSizes.of(config, dtype, plan.tensor_parallel_size, fp8=True)
    bf16 = {r["batch"]: r for r in data["decode"] if r["graphs"]}
    fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)
    print(f"\nFP8 weights ({fp8.get('weights')}) beside bf16, same run, CUDA graphs")
    print("    B | bf16 tok/s | fp8 tok/s | fp8/bf16 | fp8 floor tok/s | fp8 % floor")
    rows = []
    for r in fp8["decode"]:
        b = r["batch"]
        floor = b / (
            fp8_sizes.decode_step_bytes(b, plan.input_len + plan.output_len / 2) / ceilings["copy_bytes_per_s"]
        )
        base = bf16.get(b, {}).get("tok_s")
        row = {"batch": b, "fp8_tok_s": r["tok_s"], "bf16_tok_s": base, "fp8_floor_tok_s": floor,
               "fp8_over_bf16": base and r["tok_s"] / base, "fp8_pct_floor": 100 * r["tok_s"] / floor}  # fmt: skip
        rows.append(row)
        print(
            f"{b:5d} | {fmt(base):>10} | {r['tok_s']:9.1f} | {fmt(row['fp8_over_bf16'], '.2f'):>8} | "
            f"{floor:15.1f} | {row['fp8_pct_floor']:11.0f}"
        )
    fp8["summary"] = rows
    base_prefill = {r["tokens"]: r["ms"] for r in data["prefill"]}
    for r in fp8["prefill"]:
        print(f"prefill {r['tokens']}: fp8 {r['ms']:.1f} ms, bf16 {fmt(base_prefill.get(r['tokens']))} ms")
    if fp8.get("weight_bytes") and plan.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        kv = sizes.kv_bytes_per_token()
        for name, weights in (("bf16", sizes.weight_bytes()), ("fp8", fp8["weight_bytes"])):
            tokens = max(0, int((0.9 * total - weights) // kv))
            fp8[f"{name}_kv_tokens_at_0.9"] = tokens
            print(f"{name}: weights {weights / 2**30:.1f} GiB; at 90% of this card, KV for {tokens:,} tokens")


def prefix_agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy generations share."""
    return sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(a, b)))


def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --cpu-smoke to check the script on a CPU")
        return 2
    out_dir = Path(os.environ.get("OUT", "."))
    report = Report(Path(args.out) if args.out else out_dir / "model_gpu.json", args.time_budget_s)
    data = report.data
    dtype = getattr(torch, plan.dtype)
    card = torch.cuda.get_device_name() if plan.device == "cuda" else "cpu"
    data.update(card=card, plan=asdict(plan), torch=torch.__version__)
    try:
        import transformers
        import triton

        data.update(transformers_version=transformers.__version__, triton=triton.__version__)
    except ImportError as exc:
        data["imports"] = str(exc)

    ckpt = Path(tempfile.mkdtemp(prefix="splitvl-bench-"))
    write_tiny_checkpoint(ckpt, shapes=plan.shapes, num_layers=plan.layers, metadata_only=True)
    config = load_config(ckpt)
    sizes = ModelSizes.of(config, dtype, plan.tensor_parallel_size)
    data["model"] = {
        "layers": sizes.layers,
        "params": sizes.total_params,
        "weight_bytes": sizes.total_params * sizes.itemsize,
    }
    print(
        f"{card} | torch {torch.__version__} | transformers {data.get('transformers_version')} | "
        f"triton {data.get('triton')}"
    )
    print(
        f"model: {sizes.layers} layers, {sizes.total_params / 1e9:.2f} B params, {plan.dtype}, random weights "
        f"(what ran: batches {plan.batches}, input {plan.input_len}, output {plan.output_len}, "
        f"prefill {plan.prefill_lens}, tensor_parallel_size {plan.tensor_parallel_size}"
        f"{', expert_parallel' if plan.expert_parallel else ''})"
    )

    ceilings = None
    with report.section("ceilings") as go:
        if go:
            ceilings = measure_ceilings(plan)
            data["ceilings"] = ceilings
            print(
                f"  copy {ceilings['copy_bytes_per_s'] / 1e9:.4g} GB/s (read + write), "
                f"matmul {ceilings['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s"
            )

    engine = None
    with report.section("engine build (random weights on the device, KV cache, CUDA graph capture)") as go:
        if go:
            t0 = time.perf_counter()
            engine = build_engine(ckpt, plan, kv_blocks(plan, sizes))
            data["engine_build_s"] = time.perf_counter() - t0
            mem = torch.cuda.memory_allocated() / 2**30 if plan.device == "cuda" else 0.0
            data["graph_buckets"] = engine.runner.decode_graphs.sizes if engine.runner.decode_graphs else []
            print(
                f"  {data['engine_build_s']:.1f} s, {engine.runner.num_kv_blocks} KV blocks, "
                f"graph buckets {data['graph_buckets']}, {mem:.1f} GiB allocated"
            )

    data["decode"], data["prefill"] = [], []
    decode_sections(report, engine, plan, graphs=True)
    with report.section("engine prefill") as go:
        if go and engine is not None:
            for length in plan.prefill_lens:
                row = prefill_run(engine, length, reps=3)
                data["prefill"].append(row)
                print(f"  T={length}: {row['ms']:.1f} ms to the first token")
    ours = None
    if engine is not None:
        ours = engine.runner.model  # for transformers, unless the eager engine replaces it
        engine = close_engine(engine, plan)
        if plan.fp8:
            ours = None  # room for the FP8 engine; the eager engine's weights serve transformers
            gc.collect()
            fp8_sections(report, plan, config, dtype)
        # The eager runs matter least: they leave time for transformers. A second engine with
        # cuda_graphs off, as a user would set it; same seed, so the same random weights.
        reserve = 60.0 if args.quick else 120.0
        with report.section("engine build, cuda_graphs off", reserve) as go:
            if go:
                ours = None  # two copies of the weights may not fit
                gc.collect()
                engine = build_engine(ckpt, plan, kv_blocks(plan, sizes), graphs=False)
        decode_sections(report, engine, plan, graphs=False, reserve_s=reserve)
        if engine is not None:
            ours = engine.runner.model
            engine = close_engine(engine, plan)

    if plan.tensor_parallel_size > 1:
        ours = None  # rank 0 holds a shard; transformers needs the whole model on one GPU
        data["transformers"] = "left out at tensor_parallel_size > 1: compare with a TP=1 run's"
        print(f"transformers: {data['transformers']}")
    with report.section("transformers on the same weights") as go:
        if go and ours is not None:
            hf = transformers_model(ours, ckpt, plan.device, dtype)
            b1 = next((r for r in data["decode"] if r["batch"] == 1 and r["graphs"]), None)
            data["hf"] = {"decode": [], "prefill": []}
            transformers_runs(hf, plan, config.text.vocab_size, b1["prompt0"] if b1 else None, data["hf"], ours)
            del hf

    shutil.rmtree(ckpt, ignore_errors=True)
    try:
        summarize(data, sizes, plan)
        fp8_summary(data, sizes, config, dtype, plan)
    except Exception as exc:  # the sections' numbers are in the JSON already; say why the table is not
        traceback.print_exc()
        data["errors"]["summary"] = f"{type(exc).__name__}: {exc}"
    report.write()
    print(f"\nwrote {report.path}")
    return 1 if data["errors"] else 0


def close_engine(engine: EngineCore, plan: Plan) -> None:
    """Frees the KV cache and the graphs' memory for what runs next."""
    engine.close()
    gc.collect()
    if plan.device == "cuda":
        torch.cuda.empty_cache()


def summarize(data: dict, sizes: ModelSizes, plan: Plan) -> None:
    """Add floors and ratios to `data`, and print the table."""
    ceilings = data.get("ceilings")
    hf = data.get("hf", {})
    hf_decode = {r["batch"]: r for r in hf.get("decode", [])}
    runs = {(r["batch"], r["graphs"]): r for r in data["decode"]}
    fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)
    print(
        f"\n#### {data['card']} | torch {data['torch']} | triton {data.get('triton')} | transformers "
        f"{data.get('transformers_version')} | {sizes.layers} layers, {plan.dtype}, random weights"
    )
    if ceilings:
        print(
            f"copy {ceilings['copy_bytes_per_s'] / 1e9:.4g} GB/s (read+write) | matmul "
            f"{ceilings['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s | engine build {fmt(data.get('engine_build_s'))} s"
        )
    print(
        f"\ndecode tok/s (input {plan.input_len}, output {plan.output_len}, greedy; steps where the whole batch decodes)"
    )
    print(
        "    B | ours graphs | ours eager | graph/eager | transformers | ours/hf | floor tok/s | % floor | ms/step | graph=eager tokens"
    )
    summary = []
    for batch in plan.batches:
        g, e, h = runs.get((batch, True)), runs.get((batch, False)), hf_decode.get(batch)
        floor = None
        if ceilings:
            step_bytes = sizes.decode_step_bytes(batch, plan.input_len + plan.output_len / 2)
            floor = batch / (step_bytes / ceilings["copy_bytes_per_s"])
        best = g or e
        agree = None
        if g and e:
            agree = sum(prefix_agreement(a, b) for a, b in zip(g["generated"], e["generated"])) / sum(
                len(a) for a in g["generated"]
            )
        row = {
            "batch": batch,
            "graphs_tok_s": g and g["tok_s"],
            "eager_tok_s": e and e["tok_s"],
            "hf_tok_s": h and h["tok_s"],
            "floor_tok_s": floor,
            "graph_over_eager": g and e and g["tok_s"] / e["tok_s"],
            "ours_over_hf": best and h and best["tok_s"] / h["tok_s"],
            "pct_floor": best and floor and 100 * best["tok_s"] / floor,
            "graph_eager_token_agreement": agree,
        }
        summary.append(row)
        print(
            f"{batch:5d} | {fmt(row['graphs_tok_s']):>11} | {fmt(row['eager_tok_s']):>10} | "
            f"{fmt(row['graph_over_eager'], '.2f'):>11} | {fmt(row['hf_tok_s']):>12} | {fmt(row['ours_over_hf'], '.2f'):>7} | "
            f"{fmt(floor):>11} | {fmt(row['pct_floor'], '.0f'):>7} | {fmt(best and best['step_ms_median'], '.2f'):>7} | "
            f"{fmt(agree, '.0%'):>6}"
        )
    data["decode_summary"] = summary
    print("\nprefill: time to the first token of one prompt")
    print("     T | ours ms | transformers ms | hf/ours | floor ms | % floor")
    hf_prefill = {r["tokens"]: r for r in hf.get("prefill", [])}
    prefill_summary = []
    for row in data["prefill"]:
        t = row["tokens"]
        h = hf_prefill.get(t)
        floor = 1e3 * sizes.prefill_floor_s(t, ceilings) if ceilings else None
        entry = {
            "tokens": t,
            "ms": row["ms"],
            "hf_ms": h and h["ms"],
            "floor_ms": floor,
            "hf_over_ours": h and h["ms"] / row["ms"],
            "pct_floor": floor and 100 * floor / row["ms"],
        }
        prefill_summary.append(entry)
        print(
            f"{t:6d} | {row['ms']:7.1f} | {fmt(entry['hf_ms']):>15} | {fmt(entry['hf_over_ours'], '.2f'):>7} | "
            f"{fmt(floor):>8} | {fmt(entry['pct_floor'], '.0f'):>7}"
        )
    data["prefill_summary"] = prefill_summary
    b1, h1 = runs.get((1, True)), hf_decode.get(1)
    if b1 and h1:
        agree = prefix_agreement(b1["generated"][0], h1["tokens0"])
        data["hf_greedy_agreement_b1"] = agree
        print(f"\ngreedy tokens at B=1, ours (graphs) vs transformers: first {agree} of {len(h1['tokens0'])} agree")
    if data["errors"]:
        print("\nsections that failed: " + "; ".join(f"{k}: {v}" for k, v in data["errors"].items()))
    if data["skipped"]:
        print("sections skipped for time: " + ", ".join(data["skipped"]))


if __name__ == "__main__":
    from splitvl.commands.bench import add_model_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    sys.exit(run(parser.parse_args()))
