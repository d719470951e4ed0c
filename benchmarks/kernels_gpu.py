"""GPU benchmark of models/kernels on one H100/H200: correctness first, then time against the floors.

    python benchmarks/kernels_gpu.py            # everything, < 5 minutes (config sweep included)
    python benchmarks/kernels_gpu.py --quick    # a ~1 minute subset

Prints the card, the two measured ceilings (device-to-device copy bandwidth, bf16 matmul rate),
then per workload: the Triton kernel (eager, and replayed from a CUDA graph where capturable),
the torch reference, transformers' grouped_mm experts where it can be called, the floor
max(bytes / copy bandwidth, flops / matmul rate) and the kernel's share of it. Every kernel is
checked in bf16 against an fp32 reference on fresh random data before it is timed. Full numbers
go to $OUT/kernels_gpu.json when OUT is set (or to --out).

Needs only torch, triton, numpy and transformers (and this repository on the path).
Legend: T tokens, E experts, K experts per token, H hidden, I expert intermediate, B sequences,
Hq/Hkv heads, D head dim, S block size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.fp8 import dequantize, dequantize_experts, quantize, quantize_experts
from models.kernels.fp8_linear import fp8_linear
from models.kernels.fused_moe import MoeConfig, moe_config, triton_fused_experts
from models.kernels.moe_align import _align_chunked, _align_one_program, align_pairs_to_experts
from models.kernels.paged_attention import _torch_paged_decode, paged_decode_attention
from models.kernels.prefill_attention import (
    context_slots,
    flash_varlen_available,
    varlen_causal_attention,
)
from models.moe import torch_fused_experts

E, K, H, I = 128, 8, 2048, 768  # Qwen3-VL-30B-A3B experts
HQ, HKV, D, S = 32, 4, 128, 16  # its attention, and the cache block size
DT = torch.bfloat16
DEVICE = "cuda"  # tests/test_kernels_benchmark.py runs this file small on CPU (interpreter, fp32)
BF16_TOL = 1e-2  # bf16 operands land between 1e-3 and 1e-2 relative error (METHOD.md)

# Alternatives the sweep tries per T besides the table's pick (block_m, n_up, n_down, k, warps, stages).
SWEEP = {
    "decode": [
        MoeConfig(16, 16, 64, 128, 4, 4),
        MoeConfig(16, 16, 32, 256, 4, 4),
        MoeConfig(16, 16, 64, 256, 4, 3),
        MoeConfig(16, 32, 32, 128, 4, 5),
        MoeConfig(16, 16, 32, 128, 2, 5),
        MoeConfig(16, 32, 64, 128, 4, 4),
        MoeConfig(16, 32, 128, 256, 4, 3),
        MoeConfig(16, 64, 128, 128, 4, 3),
    ],
    "mid": [MoeConfig(16, 64, 128, 128, 4, 3), MoeConfig(32, 64, 128, 128, 4, 3), MoeConfig(32, 128, 128, 64, 8, 3)],
    "prefill": [
        MoeConfig(64, 64, 128, 64, 4, 4),
        MoeConfig(128, 64, 128, 64, 8, 4),
        MoeConfig(128, 128, 256, 64, 8, 3),
        MoeConfig(128, 64, 128, 64, 4, 3),
    ],
}


def time_ms(calls: list[Callable[[], object]], graph: bool = False, budget_s: float = 0.25) -> float:
    """Median milliseconds per call; `calls` rotate over distinct input sets so that repeated
    runs do not just measure L2. With graph=True the passes are replayed from one CUDA graph."""
    for _ in range(2):
        for call in calls:
            call()
    torch.cuda.synchronize()
    run: Callable[[], object] = lambda: [call() for call in calls]
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            run()
        run = cuda_graph.replay
    samples: list[float] = []
    spent = 0.0
    while len(samples) < 5 or (spent < budget_s * 1e3 and len(samples) < 200):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
        spent += samples[-1]
    return statistics.median(samples) / len(calls)


def try_time(calls: list[Callable[[], object]], graph: bool = False) -> float | None:
    try:
        return time_ms(calls, graph)
    except Exception as exc:  # a baseline that cannot run here is reported, not fatal
        print(f"    ({'graph' if graph else 'eager'} timing failed: {type(exc).__name__}: {str(exc)[:120]})")
        return None


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(out).any():
        return math.inf
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check(name: str, err: float, fatal: bool = True) -> bool:
    """Print the relative error; a kernel of ours that fails stops the run (its times would lie)."""
    ok = err < BF16_TOL
    print(f"  check {name}: rel err {err:.2e} {'ok' if ok else 'FAIL'}")
    if not ok and fatal:
        raise SystemExit(f"{name}: bf16 result differs from the fp32 reference by {err:.2e} (> {BF16_TOL})")
    return ok


def ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s), measured on random data."""
    src = torch.randn(512 * 2**20, device=DEVICE, dtype=DT)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = time_ms([lambda: dst.copy_(src)])
    bandwidth = 2 * src.numel() * src.element_size() / copy_ms / 1e6
    n = 8192
    a, b = torch.randn(n, n, device=DEVICE, dtype=DT), torch.randn(n, n, device=DEVICE, dtype=DT)
    mm_ms = time_ms([lambda: a @ b])
    return bandwidth, 2 * n**3 / mm_ms / 1e9


def hf_grouped_mm(gate_up: torch.Tensor, down: torch.Tensor) -> Callable | None:
    """transformers' grouped_mm experts on our weights, or None (with the reason) if unavailable."""
    try:
        import transformers
        from transformers.integrations.moe import grouped_mm_experts_forward
        from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

        config = Qwen3VLMoeTextConfig(
            hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K, hidden_act="silu"
        )
        with torch.device("meta"):
            experts = Qwen3VLMoeTextExperts(config)
        experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
        experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
        print(f"  transformers {transformers.__version__}: integrations.moe.grouped_mm_experts_forward")
        return lambda x, w, ids: grouped_mm_experts_forward(experts, x, ids, w)
    except Exception as exc:
        print(f"  transformers grouped_mm not callable here: {type(exc).__name__}: {str(exc)[:160]}")
        return None


def bench_moe(token_counts: list[int], sweep: bool, bandwidth: float, peak: float) -> Iterator[dict]:
    print(f"\n== fused MoE  E={E} K={K} H={H} I={I} {DT}")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    gate_up = (torch.randn(E, 2 * I, H, device=DEVICE, generator=gen) / H**0.5).to(DT)
    down = (torch.randn(E, H, I, device=DEVICE, generator=gen) / I**0.5).to(DT)
    hf = hf_grouped_mm(gate_up, down)
    # The same experts in block-wise FP8 (Qwen's checkpoint layout), read by the weight-only path.
    (gate_up8, gate_up_s), (down8, down_s) = quantize_experts(gate_up, gate_up=True), quantize_experts(down)
    fp8_scales = (gate_up_s, down_s)
    fp8_ref_weights = (
        dequantize_experts(gate_up8, gate_up_s, torch.float32, gate_up=True),
        dequantize_experts(down8, down_s, torch.float32),
    )
    for tokens in token_counts:
        sets = []  # rotating inputs: each set routes to other experts
        for _ in range(8 if tokens <= 256 else 2):
            x = torch.randn(tokens, H, device=DEVICE, generator=gen).to(DT)
            probs = torch.softmax(torch.randn(tokens, E, device=DEVICE, generator=gen) * 2, -1)
            w, ids = torch.topk(probs, K, dim=-1)
            sets.append((x, (w / w.sum(-1, keepdim=True)).to(DT), ids))
        x, w, ids = sets[0]
        ref = torch_fused_experts(x.float(), gate_up.float(), down.float(), w.float(), ids)
        check(f"moe T={tokens}", rel_err(triton_fused_experts(x, gate_up, down, w, ids), ref))
        hf_ok = hf is not None and check(f"hf grouped_mm T={tokens}", rel_err(hf(x, w, ids), ref), fatal=False)

        active = sum(torch.unique(s[2]).numel() for s in sets) / len(sets)
        bytes_moved = active * 3 * H * I * DT.itemsize + 2 * tokens * H * DT.itemsize
        flops = 2 * tokens * K * 3 * H * I
        floor_ms = max(bytes_moved / bandwidth / 1e6, flops / peak / 1e9)
        calls = lambda fn: [lambda s=s: fn(*s) for s in sets]
        row = {
            "T": tokens,
            "active_experts": active,
            "floor_ms": floor_ms,
            "bound": "bytes" if bytes_moved / bandwidth / 1e6 >= flops / peak / 1e9 else "flops",
        }
        row["triton_ms"] = time_ms(calls(lambda x, w, ids: triton_fused_experts(x, gate_up, down, w, ids)))
        row["triton_again_ms"] = time_ms(calls(lambda x, w, ids: triton_fused_experts(x, gate_up, down, w, ids)))
        row["triton_graph_ms"] = try_time(
            calls(lambda x, w, ids: triton_fused_experts(x, gate_up, down, w, ids)), graph=True
        )
        block_m = moe_config(tokens).block_m
        row["align_graph_ms"] = try_time(
            [lambda s=s: align_pairs_to_experts(s[2], E, block_m) for s in sets], graph=True
        )
        # Both Triton alignments at every size: where SMALL_PAIRS should sit.
        row["align_one_program_graph_ms"] = (
            try_time([lambda s=s: _align_one_program(s[2], E, block_m) for s in sets], graph=True)
            if tokens * K <= 16384
            else None
        )
        row["align_chunked_graph_ms"] = try_time(
            [lambda s=s: _align_chunked(s[2], E, block_m) for s in sets], graph=True
        )
        print(
            f"  T={tokens} align (graph): one program {fmt(row['align_one_program_graph_ms'])} us, "
            f"chunked {fmt(row['align_chunked_graph_ms'])} us"
        )
        fp8_ref = torch_fused_experts(x.float(), *fp8_ref_weights, w.float(), ids)
        fp8_err = rel_err(triton_fused_experts(x, gate_up8, down8, w, ids, scales=fp8_scales), fp8_ref)
        check(f"moe fp8 T={tokens}", fp8_err)
        del fp8_ref
        scale_bytes = active * 4 * (gate_up_s[0].numel() + down_s[0].numel())
        fp8_bytes = active * 3 * H * I + scale_bytes + 2 * tokens * H * DT.itemsize
        row["fp8_floor_ms"] = max(fp8_bytes / bandwidth / 1e6, flops / peak / 1e9)
        row["fp8_graph_ms"] = try_time(
            calls(lambda x, w, ids: triton_fused_experts(x, gate_up8, down8, w, ids, scales=fp8_scales)), graph=True
        )
        row["fp8_rel_err_vs_dequantized"] = fp8_err
        print(
            f"  T={tokens} FP8 weights (graph): {fmt(row['fp8_graph_ms'])} us against bf16 "
            f"{fmt(row['triton_graph_ms'])} us, FP8 floor {fmt(row['fp8_floor_ms'])} us, error vs the "
            f"dequantized weights {fp8_err:.1e}"
        )
        row["torch_ms"] = time_ms(calls(lambda x, w, ids: torch_fused_experts(x, gate_up, down, w, ids)))
        row["hf_grouped_mm_ms"] = try_time(calls(hf)) if hf_ok else None
        row["config"] = dataclasses.asdict(moe_config(tokens))
        if sweep:
            regime = "decode" if tokens <= 64 else "mid" if tokens <= 512 else "prefill"
            best = (
                row["triton_graph_ms"] if tokens <= 256 and row["triton_graph_ms"] else row["triton_ms"],
                moe_config(tokens),
            )
            for config in SWEEP[regime]:
                if config == moe_config(tokens):
                    continue
                if not check(
                    f"sweep {config}",
                    rel_err(triton_fused_experts(x, gate_up, down, w, ids, config=config), ref),
                    fatal=False,
                ):
                    continue
                # Decode sizes replay from a graph, as the engine runs them: eager timing there
                # would measure the host's launch cost, not the kernels.
                ms = try_time(
                    calls(lambda x, w, ids, c=config: triton_fused_experts(x, gate_up, down, w, ids, config=c)),
                    graph=tokens <= 256,
                )
                if ms is None:
                    continue
                print(f"  sweep T={tokens} {config}: {ms * 1e3:.1f} us")
                best = min(best, (ms, config), key=lambda b: b[0])
            row["best_ms"], row["best_config"] = best[0], dataclasses.asdict(best[1])
        del ref
        yield row
        print(
            f"  T={tokens}: triton {fmt(row['triton_ms'])} us (again {fmt(row['triton_again_ms'])}),"
            f" torch {fmt(row['torch_ms'])} us, floor {fmt(floor_ms)} us ({row['bound']})"
        )


def bench_fp8_linear(row_counts: list[int], bandwidth: float) -> Iterator[dict]:
    """The FP8 linear (weight-only) against bf16 F.linear (cuBLAS) at the attention's shapes."""
    print("\n== FP8 linear (weight-only, 128x128 block scales) vs bf16 F.linear")
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    for name, k, n in (("qkv", H, (HQ + 2 * HKV) * D), ("o_proj", HQ * D, H)):
        weight = (torch.randn(n, k, device=DEVICE, generator=gen) / k**0.5).to(DT)
        w8, scale = quantize(weight.float())
        for rows in row_counts:
            x = torch.randn(rows, k, device=DEVICE, generator=gen).to(DT)
            ref = torch.nn.functional.linear(x.float(), dequantize(w8, scale, torch.float32))
            err = rel_err(fp8_linear(x, w8, scale), ref)
            check(f"fp8 linear {name} M={rows}", err)
            row = {
                "layer": name,
                "M": rows,
                "fp8_graph_ms": try_time([lambda: fp8_linear(x, w8, scale)], graph=True),
                "bf16_graph_ms": try_time([lambda: torch.nn.functional.linear(x, weight)], graph=True),
                "fp8_floor_ms": (n * k + 2 * rows * (k + n)) / bandwidth / 1e6,
                "bf16_floor_ms": (2 * n * k + 2 * rows * (k + n)) / bandwidth / 1e6,
                "rel_err": err,
            }
            print(
                f"  {name} M={rows}: fp8 {fmt(row['fp8_graph_ms'])} us (floor {fmt(row['fp8_floor_ms'])}), "
                f"bf16 {fmt(row['bf16_graph_ms'])} us (floor {fmt(row['bf16_floor_ms'])})"
            )
            yield row


def decode_inputs(batch: int, ctx: int, sets: int, gen: torch.Generator):
    """One cache pool and `sets` block-table sets pointing at disjoint parts of it."""
    blocks = -(-ctx // S)
    pool = torch.randn(2, sets * batch * blocks, S, HKV, D, device=DEVICE, generator=gen).to(DT)
    perm = torch.randperm(sets * batch * blocks, device=DEVICE, generator=gen).to(torch.int32)
    tables = perm.view(sets, batch, blocks)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
    queries = [torch.randn(batch, HQ, D, device=DEVICE, generator=gen).to(DT) for _ in range(sets)]
    return pool, tables, lens, queries


def torch_batched_decode(q, k_cache, v_cache, tables, ctx):
    """A strong torch baseline: gather every context into [B, Hkv, ctx, D], one SDPA call."""
    keys = k_cache[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2)
    values = v_cache[tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), keys, values, enable_gqa=True)
    return out.squeeze(2)


def bench_decode(batches: list[int], contexts: list[int], bandwidth: float) -> Iterator[dict]:
    print(f"\n== paged decode attention  Hq={HQ} Hkv={HKV} D={D} S={S} {DT}")
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    for ctx in contexts:
        for batch in batches:
            kv_bytes = batch * ctx * HKV * D * 2 * DT.itemsize
            sets = min(64, max(1, -(-256 * 2**20 // kv_bytes)))  # >= 256 MB touched per pass: past L2
            pool, tables, lens, queries = decode_inputs(batch, ctx, sets, gen)
            k_cache, v_cache = pool[0], pool[1]
            ref = _torch_paged_decode(queries[0].float(), k_cache.float(), v_cache.float(), tables[0], lens)
            check(
                f"decode B={batch} ctx={ctx}",
                rel_err(paged_decode_attention(queries[0], k_cache, v_cache, tables[0], lens, max_context=ctx), ref),
            )
            del ref
            kernel = [
                lambda i=i: paged_decode_attention(queries[i], k_cache, v_cache, tables[i], lens, max_context=ctx)
                for i in range(sets)
            ]
            row = {"B": batch, "ctx": ctx, "floor_ms": kv_bytes / bandwidth / 1e6}
            row["triton_ms"] = time_ms(kernel)
            row["triton_graph_ms"] = try_time(kernel, graph=True)
            row["torch_batched_ms"] = try_time(
                [
                    lambda i=i: torch_batched_decode(queries[i], k_cache, v_cache, tables[i], ctx)
                    for i in range(min(sets, 4))
                ]
            )
            if batch <= 16:  # the repo's reference loops over sequences: seconds at B=256
                row["torch_loop_ms"] = time_ms(
                    [lambda: _torch_paged_decode(queries[0], k_cache, v_cache, tables[0], lens)], budget_s=0.1
                )
            yield row
            print(
                f"  B={batch} ctx={ctx}: triton {row['triton_ms'] * 1e3:.1f} us, floor {row['floor_ms'] * 1e3:.1f} us"
            )


def reference_rows(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, prefix: int
) -> torch.Tensor:
    """fp32 causal attention of the query rows `rows` only (a full fp32 reference of an 8k x 32k
    problem would not fit): [r, Hq, D]."""
    group = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, 1)  # [C, Hq, D]
    v = values.float().repeat_interleave(group, 1)
    scores = torch.einsum("rhd,chd->hrc", q[rows].float(), k) / math.sqrt(q.shape[-1])  # [Hq, r, C]
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= (prefix + rows)[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hrc,chd->rhd", probs, v)


def bench_prefill(token_counts: list[int], peak: float) -> Iterator[dict]:
    """Decision data for a Triton prefill kernel: torch's flash varlen (one call, GQA native) on
    whole prompts and on a chunk behind a paged prefix, against the matmul-rate floor."""
    available = flash_varlen_available(torch.empty(1, device=DEVICE, dtype=DT))
    print(f"\n== varlen causal prefill  Hq={HQ} Hkv={HKV} D={D} {DT}  (torch flash varlen available: {available})")
    from models.attention import causal_attention

    gen = torch.Generator(device=DEVICE).manual_seed(2)
    for tokens in token_counts:
        for prefix in (0, 3 * tokens):  # whole prompt; a chunk of `tokens` behind 3x as many cached
            ctx = prefix + tokens
            q = torch.randn(tokens, HQ, D, device=DEVICE, generator=gen).to(DT)
            blocks = -(-ctx // S)
            pool = torch.randn(2, blocks + 7, S, HKV, D, device=DEVICE, generator=gen).to(DT)
            tables = torch.randperm(blocks + 7, device=DEVICE, generator=gen)[:blocks].view(1, blocks)
            flat = pool.view(2, -1, HKV, D)
            slots = context_slots(tables, [ctx], S)
            keys, values = flat[0, slots], flat[1, slots]
            sample = torch.cat(
                [
                    torch.arange(min(tokens, 256)),
                    torch.randint(0, tokens, (256,), generator=torch.Generator().manual_seed(tokens)),
                ]
            ).to(DEVICE)
            out = varlen_causal_attention(q, keys, values, [tokens], [ctx])
            check(
                f"prefill T={tokens} prefix={prefix}",
                rel_err(out[sample], reference_rows(q, keys, values, sample, prefix)),
            )
            flops = 4 * HQ * D * (tokens * prefix + tokens * (tokens + 1) / 2)
            row = {"T": tokens, "prefix": prefix, "floor_ms": flops / peak / 1e9}
            # As the backend runs it: slots built once per forward, the gather once per layer.
            row["gather_ms"] = time_ms([lambda: (flat[0, slots], flat[1, slots])])
            row["attention_ms"] = time_ms([lambda: varlen_causal_attention(q, keys, values, [tokens], [ctx])])
            # The reference backend's call; with a prefix it takes an explicit mask, and SDPA's
            # math fallback for 8k x 32k would need tens of GB, so that case is not run.
            small = prefix == 0 or tokens * ctx <= 2**26
            row["torch_sdpa_ms"] = try_time([lambda: causal_attention(q, keys, values)]) if small else None
            row["tflops"] = flops / row["attention_ms"] / 1e9
            yield row
            print(
                f"  T={tokens} prefix={prefix}: gather {fmt(row['gather_ms'])} us"
                f" + attention {fmt(row['attention_ms'])} us ({row['tflops']:.0f} TFLOP/s)"
            )


def fmt(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms * 1e3:.1f}"


def pct(floor_ms: float, ms: float | None) -> str:
    return "n/a" if ms is None else f"{100 * floor_ms / ms:.0f}%"


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A right-aligned text table: each column as wide as its widest cell."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    for cells in [header, *rows]:
        print("  " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)))


def print_tables(
    device: str, bandwidth: float, peak: float, moe: list[dict], decode: list[dict], prefill: list[dict]
) -> None:
    print(f"\n#### {device} | torch {torch.__version__} | triton {__import__('triton').__version__}")
    print(f"copy {bandwidth:.0f} GB/s (read+write) | bf16 matmul {peak:.0f} TFLOP/s | times in us")

    def best(r: dict) -> str:
        return f"{fmt(r['best_ms'])} {tuple(r['best_config'].values())}" if "best_ms" in r else "-"

    table(
        "fused MoE (% floor from the graph time; hf = transformers grouped_mm; align = its graph time alone)",
        ["T", "experts", "floor", "bound", "eager", "again", "graph", "% floor", "align", "torch", "hf", "best",
         "fp8 floor", "fp8 graph", "fp8 % floor", "bf16/fp8"],
        [
            [str(r["T"]), f"{r['active_experts']:.1f}", fmt(r["floor_ms"]), r["bound"], fmt(r["triton_ms"]),
             fmt(r["triton_again_ms"]), fmt(r["triton_graph_ms"]),
             pct(r["floor_ms"], r["triton_graph_ms"] or r["triton_ms"]), fmt(r["align_graph_ms"]), fmt(r["torch_ms"]),
             fmt(r["hf_grouped_mm_ms"]), best(r), fmt(r.get("fp8_floor_ms")), fmt(r.get("fp8_graph_ms")),
             pct(r["fp8_floor_ms"], r.get("fp8_graph_ms")) if r.get("fp8_floor_ms") else "-",
             f"{r['triton_graph_ms'] / r['fp8_graph_ms']:.2f}" if r.get("fp8_graph_ms") and r.get("triton_graph_ms") else "-"]
            for r in moe
        ],
    )  # fmt: skip
    table(
        "paged decode (torch loop = the repo's reference backend)",
        ["B", "ctx", "floor", "eager", "graph", "% floor", "torch gather+SDPA", "torch loop"],
        [
            [str(r["B"]), str(r["ctx"]), fmt(r["floor_ms"]), fmt(r["triton_ms"]), fmt(r["triton_graph_ms"]),
             pct(r["floor_ms"], r["triton_graph_ms"] or r["triton_ms"]), fmt(r["torch_batched_ms"]),
             fmt(r.get("torch_loop_ms"))]
            for r in decode
        ],
    )  # fmt: skip
    table(
        "prefill (floor at the matmul rate; torch SDPA = the repo's reference backend)",
        ["T", "prefix", "floor", "gather", "ours (varlen or SDPA)", "TFLOP/s", "% floor", "torch SDPA"],
        [
            [str(r["T"]), str(r["prefix"]), fmt(r["floor_ms"]), fmt(r["gather_ms"]), fmt(r["attention_ms"]),
             f"{r['tflops']:.0f}", pct(r["floor_ms"], r["attention_ms"]), fmt(r["torch_sdpa_ms"])]
            for r in prefill
        ],
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute subset, no config sweep")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for kernels_gpu.json (default $OUT)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references stay fp32
    device = torch.cuda.get_device_name()
    print(f"{device}: {torch.cuda.get_device_properties(0).multi_processor_count} SMs")
    bandwidth, peak = ceilings()
    print(f"ceilings: copy {bandwidth:.0f} GB/s, bf16 matmul {peak:.0f} TFLOP/s")
    moe: list[dict] = []
    decode: list[dict] = []
    prefill: list[dict] = []
    linear: list[dict] = []
    if args.quick:
        plan = [
            (bench_moe([1, 64, 1024], sweep=False, bandwidth=bandwidth, peak=peak), moe),
            (bench_fp8_linear([1, 64, 1024], bandwidth), linear),
            (bench_decode([1, 64], [4096], bandwidth), decode),
            (bench_prefill([1024], peak), prefill),
        ]
    else:
        plan = [
            (bench_moe([1, 16, 64, 256, 1024, 8192], sweep=True, bandwidth=bandwidth, peak=peak), moe),
            (bench_fp8_linear([1, 16, 64, 256, 1024, 8192], bandwidth), linear),
            (bench_decode([1, 16, 64, 256], [512, 4096], bandwidth), decode),
            (bench_prefill([1024, 8192], peak), prefill),
        ]
    failed = False
    with torch.inference_mode():
        for rows, into in plan:  # a failing section keeps the rows it finished and the others run
            try:
                into.extend(rows)
            except (Exception, SystemExit):
                failed = True
                traceback.print_exc()
    print_tables(device, bandwidth, peak, moe, decode, prefill)
    if args.out:
        path = Path(args.out) / "kernels_gpu.json"
        path.write_text(
            json.dumps(
                {
                    "device": device,
                    "copy_GBps": bandwidth,
                    "bf16_TFLOPs": peak,
                    "moe": moe,
                    "fp8_linear": linear,
                    "decode": decode,
                    "prefill": prefill,
                },
                indent=1,
            )
        )
        print(f"\nwrote {path}")
    if failed:
        raise SystemExit("a section failed: see the traceback above")


if __name__ == "__main__":
    main()
