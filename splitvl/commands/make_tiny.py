"""`splitvl make-tiny DIR`: write a random checkpoint in the Hub layout, offline."""

from __future__ import annotations

import argparse

ARCH_CHOICES = ("qwen3-vl-moe", "qwen3-moe", "qwen2-moe")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-tiny",
        help="write a random test checkpoint (weights, config, tokenizer, processor files)",
        description=(
            "Write a random checkpoint in the Hugging Face Hub layout: safetensors weights with\n"
            "unit-scale activations and decisive routing, config.json, a byte-level BPE tokenizer with\n"
            "Qwen's special tokens and chat template, generation and preprocessor configs.\n"
            "Same --seed, same bytes. The default (tiny Qwen3-VL-MoE) takes well under a second.\n"
            "--shapes qwen3-vl-30b-a3b writes the real model's shapes in bf16: about 1.25 GB per text\n"
            "layer plus 2.3 GB of embeddings, lm_head and vision tower, so pair it with --layers."
        ),
        epilog="examples:\n"
        "  splitvl make-tiny /tmp/tiny-vl\n"
        "  splitvl make-tiny /tmp/tiny-text --text-only --seed 1\n"
        "  splitvl make-tiny /tmp/wide --shapes qwen3-vl-30b-a3b --layers 4\n"
        "  splitvl make-tiny /tmp/tiny-fp8 --fp8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("directory", metavar="DIR", help="output directory (created if missing; files are overwritten)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--arch",
        choices=ARCH_CHOICES,
        default=None,
        help="model family (default qwen3-vl-moe; qwen2-moe has a shared expert and qkv bias)",
    )
    parser.add_argument("--text-only", action="store_true", help="same as --arch qwen3-moe")
    parser.add_argument(
        "--shapes",
        choices=("tiny", "qwen3-vl-30b-a3b"),
        default="tiny",
        help="tiny (fp32, one file) or the real Qwen3-VL-30B-A3B shapes (bf16, ~2 GB shards)",
    )
    parser.add_argument("--layers", type=int, default=None, metavar="N", help="number of text decoder layers")
    parser.add_argument(
        "--deepstack",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        metavar="I,J,...",
        help="vision blocks whose outputs feed deepstack (tiny default 1,2,3; real 8,16,24)",
    )
    parser.add_argument(
        "--expert-layout",
        choices=("hub", "transformers", "per_expert"),
        default=None,
        help="hub: fused [E,H,2I]/[E,I,H] (VL default); transformers: fused [E,2I,H]/[E,H,I] as "
        "save_pretrained writes; per_expert: experts.{j}.*_proj.weight (text-only default)",
    )
    parser.add_argument(
        "--config-spelling",
        choices=("hub", "transformers"),
        default="hub",
        help="config.json keys as on the Hub (num_experts, rope_scaling, torch_dtype) or as "
        "transformers 5 writes them (rope_parameters, dtype, num_local_experts)",
    )
    parser.add_argument(
        "--tie-word-embeddings", action="store_true", help="no lm_head.weight; tie it to the embeddings"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="weight dtype (default float32 for tiny, bfloat16 for the real shapes)",
    )
    parser.add_argument(
        "--max-shard-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="shard the weights with an index file (default: one file for tiny, 2e9 otherwise)",
    )
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="Qwen's block-wise FP8 layout: language linear weights in float8 e4m3 with 128x128 "
        "weight_scale_inv grids, experts one by one, quantization_config in config.json",
    )
    parser.add_argument(
        "--metadata-only", action="store_true", help="write config, tokenizer and index files but no weights"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from models.tiny_checkpoint import write_tiny_checkpoint

    if args.text_only and args.arch not in (None, "qwen3-moe"):
        raise SystemExit(f"error: --text-only means --arch qwen3-moe, not {args.arch}; pass one or the other")
    arch = "qwen3-moe" if args.text_only else args.arch or "qwen3-vl-moe"
    try:
        directory = write_tiny_checkpoint(
            args.directory,
            seed=args.seed,
            arch=arch,
            shapes=args.shapes,
            num_layers=args.layers,
            deepstack_visual_indexes=args.deepstack,
            expert_layout=args.expert_layout,
            tie_word_embeddings=args.tie_word_embeddings,
            config_spelling=args.config_spelling,
            dtype=args.dtype,
            max_shard_bytes=args.max_shard_bytes,
            metadata_only=args.metadata_only,
            quantize_fp8=args.fp8,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    what = "metadata" if args.metadata_only else "checkpoint"
    print(f"wrote {arch} {args.shapes}{' fp8' if args.fp8 else ''} {what} to {directory}")
    return 0
