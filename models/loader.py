"""Loading a local checkpoint directory into our modules.

Safetensors only (one file, or shards with model.safetensors.index.json): pickle-based .bin/.pt
files are refused. `part` picks what to build and read:
  full     - the whole model (VL: Qwen3VLMoeForConditionalGeneration)
  vision   - only the vision tower; reads only `model.visual.*`
  language - only the language model (VL: Qwen3MoeForCausalLMWithDeepStack); never reads
             `model.visual.*`
Modules are built on the meta device and every tensor is read straight to the target device
and dtype, so a 60 GB checkpoint never sits in host memory twice.

Expert weights come in three layouts (DESIGN.md §3), told apart by the config's H and I:
  hub          gate_up_proj [E, H, 2I], down_proj [E, I, H]  (no `.weight` suffix)
  transformers gate_up_proj [E, 2I, H], down_proj [E, H, I]  (what transformers 5 saves)
  per-expert   experts.{j}.{gate,up,down}_proj.weight        (text-only Qwen2/3-MoE, FP8 releases)

Tensor parallelism (`tp`, models/parallel.py): only the language part splits; each rank reads
its slices through safetensors' memory-mapped `get_slice` (models/sharding.py), so no rank holds
the full model in host or device memory. FP8 weights are dequantized whole, one at a time, then
sliced (their scale blocks need not align with a rank's slice).

Block-wise FP8 checkpoints (models/fp8.py): each float8 weight is dequantized with its
`weight_scale_inv` to the compute dtype as it is read, one tensor at a time. FP8 kernels that keep
the weights in fp8 are not used yet, on CPU or GPU.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from models import fp8
from models.config import ModelConfig, TextConfig, load_config
from models.fp8_layers import make_fp8
from models.parallel import SINGLE, TensorParallel, check_divisible
from models.qwen2_moe import Qwen2MoeForCausalLM
from models.qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeForCausalLMWithDeepStack
from models.qwen3_vision import Qwen3_VisionTransformer
from models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration
from models.sharding import expert_shard, per_expert_shard, shard_of, take

log = logging.getLogger(__name__)

PARTS = ("full", "vision", "language")
_PROGRESS_MIN_BYTES = 1 << 30  # show a progress bar from 1 GiB of weights
_EXPERT_KEY = re.compile(
    r"^(.*\.mlp\.experts)\.(?:(\d+)\.(gate|up|down)_proj\.weight|(gate_up_proj|down_proj)(?:\.weight)?)$"
)


class CheckpointError(ValueError):
    """The checkpoint directory cannot be loaded; the message says which file or tensor and why."""


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tensors_read: list[str] = field(default_factory=list)  # checkpoint names actually read


def load_model(
    model_dir: str | Path,
    part: str = "full",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tp: TensorParallel = SINGLE,
    keep_fp8: bool = False,
) -> LoadedModel:
    """`keep_fp8`: an FP8 checkpoint's FP8 weights stay FP8 with their block scales
    (models/fp8_layers.py) instead of being dequantized to `dtype`; for a GPU at one rank."""
    model_dir = Path(model_dir)
    if part not in PARTS:
        raise CheckpointError(f"part must be one of {PARTS}, got {part!r}")
    config = load_config(model_dir)
    if tp.size > 1:
        if part != "language":
            raise CheckpointError(f"only the language part splits over ranks (part={part!r}, {tp.size} ranks)")
        check_divisible(config.text, tp.size, tp.expert_parallel)
    dtype = dtype or config.dtype
    device = torch.device(device)
    model, prefixes = _build(config, part, tp)
    model = model.to(dtype=dtype).to_empty(device=device)
    _retie(model, config)

    files = checkpoint_files(model_dir)
    wanted = {name: f for name, f in files.items() if any(name.startswith(p) for p in prefixes)}
    # Tensors of the other part are skipped unread; anything else is not of this model at all.
    other_part = _KNOWN_PREFIXES[config.is_vl]
    strangers = [n for n in files if n not in wanted and not any(n.startswith(p) for p in other_part)]
    if strangers:
        raise CheckpointError(
            "checkpoint does not match the config: unexpected tensors: " + _listing(sorted(strangers))
        )
    reader = _TensorReader(model_dir, device)
    if keep_fp8 and tp.size > 1:
        raise CheckpointError("FP8 weights are kept FP8 at one rank only; across ranks they are dequantized")
    fp8_kept = _fp8_modules(wanted, reader, prefixes) if keep_fp8 and config.quantization is not None else set()
    make_fp8(model, fp8_kept, device)
    filler = _ParamFiller(model, config, tp)
    dequantizer = _Fp8Reader(config, files, reader, dtype)
    total = sum(reader.nbytes(wanted))
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="loading weights", disable=total < _PROGRESS_MIN_BYTES
    ) as bar:
        for name, filename in sorted(wanted.items(), key=lambda kv: (kv[1], kv[0])):
            if name.endswith(fp8.SCALE_SUFFIX):
                continue  # read together with its weight, which may sit in another shard
            local = _strip_prefix(name, prefixes)
            source = reader.slice(filename, name)
            shape = tuple(source.get_shape())
            scale = None
            if source.get_dtype().startswith("F8_"):
                whole = source[tuple(slice(None) for _ in shape)]
                if fp8_kept:
                    source, scale = whole, dequantizer.scale_of(name, whole)
                else:  # scale blocks need not align with a rank's slice: dequantize whole, then slice
                    source = dequantizer.dequantize(name, whole)
            bar.update(filler.fill(name, local, source, shape, scale))
    dequantizer.finish(wanted)
    filler.finish()
    reader.close()
    if dequantizer.count and fp8_kept:
        log.info("FP8 checkpoint: %d weights kept FP8 with their block scales (FP8 kernels)", dequantizer.count)
    elif dequantizer.count:
        log.info(
            "FP8 checkpoint: %d weights dequantized to %s at load", dequantizer.count, str(dtype).removeprefix("torch.")
        )
    model.eval()
    return LoadedModel(model=model, config=config, tensors_read=reader.names_read)


# Every prefix a checkpoint of the kind (VL or text-only) may hold.
_KNOWN_PREFIXES = {True: ("model.visual.", "model.language_model.", "lm_head."), False: ("model.", "lm_head.")}


def _build(config: ModelConfig, part: str, tp: TensorParallel = SINGLE) -> tuple[nn.Module, dict[str, str]]:
    """The module for (arch, part) on the meta device, and checkpoint prefix -> module prefix."""
    with torch.device("meta"):
        if config.is_vl:
            if part == "vision":
                return Qwen3_VisionTransformer(config.vision), {"model.visual.": ""}
            text = {"model.language_model.": "model.", "lm_head.": "lm_head."}
            if part == "language":
                return language_model_class(config)(config.text, tp), text
            return Qwen3VLMoeForConditionalGeneration(config), {"model.visual.": "visual.", **text}
        if part == "vision":
            raise CheckpointError(f"a {config.arch} checkpoint has no vision tower (part='vision')")
        return language_model_class(config)(config.text, tp), {"model.": "model.", "lm_head.": "lm_head."}


def language_model_class(config: ModelConfig) -> type[nn.Module]:
    """What runs the language side of `config`: the deepstack class for VL checkpoints."""
    if config.is_vl:
        return Qwen3MoeForCausalLMWithDeepStack
    return Qwen2MoeForCausalLM if config.arch == "qwen2_moe" else Qwen3MoeForCausalLM


def _fp8_modules(wanted: dict[str, str], reader: _TensorReader, prefixes: dict[str, str]) -> set[str]:
    """The modules whose checkpoint weights are float8 (read from the headers, not the data): a
    linear layer, or the Experts module of per-expert FP8 weights."""
    names = set()
    for name, filename in wanted.items():
        if not name.endswith(".weight") or not reader.dtype_of(filename, name).startswith("F8_"):
            continue
        local = _strip_prefix(name, prefixes)
        expert = _EXPERT_KEY.match(local)
        names.add(expert.group(1) if expert else local.removesuffix(".weight"))
    return names


def _retie(model: nn.Module, config: ModelConfig) -> None:
    # Materialising from meta gives every parameter its own storage; tie lm_head again.
    if config.text.tie_word_embeddings and hasattr(model, "lm_head"):
        embed = model.model.embed_tokens
        model.lm_head.weight = embed.weight


def _strip_prefix(name: str, prefixes: dict[str, str]) -> str:
    for src, dst in prefixes.items():
        if name.startswith(src):
            return dst + name[len(src) :]
    raise AssertionError(name)


def checkpoint_files(model_dir: Path) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index or the single file's header."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return dict(weight_map)
    shards = sorted(model_dir.glob("*.safetensors"))
    if len(shards) == 1:
        with safe_open(shards[0], framework="pt") as f:
            return {name: shards[0].name for name in f.keys()}  # noqa: SIM118 - safe_open is not iterable
    if len(shards) > 1:
        raise CheckpointError(f"{model_dir} has {len(shards)} .safetensors files but no model.safetensors.index.json")
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{model_dir} holds only pickle checkpoints ({', '.join(pickles[:3])}); splitvl loads safetensors "
            "only, because unpickling runs arbitrary code. Convert once with transformers: "
            "AutoModel.from_pretrained(dir).save_pretrained(new_dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{model_dir} has no .safetensors weights")


class _TensorReader:
    """Opens each shard once and records which tensors were read."""

    def __init__(self, model_dir: Path, device: torch.device) -> None:
        self.model_dir = model_dir
        self.device = device
        self.handles: dict[str, object] = {}
        self.names_read: list[str] = []

    def _open(self, filename: str):
        if filename not in self.handles:
            try:
                self.handles[filename] = safe_open(self.model_dir / filename, framework="pt", device=str(self.device))
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"cannot open {self.model_dir / filename}: {exc}") from exc
        return self.handles[filename]

    def nbytes(self, wanted: dict[str, str]) -> list[int]:
        sizes = []
        for name, filename in wanted.items():
            sl = self._open(filename).get_slice(name)
            n = 1
            for d in sl.get_shape():
                n *= d
            sizes.append(n * _DTYPE_BYTES.get(sl.get_dtype(), 4))
        return sizes

    def dtype_of(self, filename: str, name: str) -> str:
        """The safetensors dtype of a tensor ("BF16", "F8_E4M3", ...), from the header."""
        return self._open(filename).get_slice(name).get_dtype()

    def read(self, filename: str, name: str) -> torch.Tensor:
        self.names_read.append(name)
        return self._open(filename).get_tensor(name)

    def slice(self, filename: str, name: str):
        """The tensor memory-mapped: indexing it reads only the bytes of the slice."""
        self.names_read.append(name)
        return self._open(filename).get_slice(name)

    def close(self) -> None:
        self.handles.clear()


_DTYPE_BYTES = {
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "U8": 1,
    "I8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


class _Fp8Reader:
    """Turns each float8 weight into a `dtype` tensor with its block scales as it is read, so
    neither the fp8 bytes nor a second copy of the model outlive one tensor."""

    def __init__(self, config: ModelConfig, files: dict[str, str], reader: _TensorReader, dtype: torch.dtype) -> None:
        self.quantization = config.quantization
        self.files = files
        self.reader = reader
        self.dtype = dtype
        self.scales_read: set[str] = set()
        self.count = 0

    def dequantize(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype not in fp8.FLOAT8_DTYPES:
            return tensor
        scale = self.scale_of(name, tensor)
        return fp8.dequantize(tensor, scale, self.dtype, self.quantization.weight_block_size)

    def scale_of(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The float32 scale grid of the FP8 weight `name`, checked against the weight and the config."""
        if self.quantization is None:
            raise CheckpointError(
                f"{name} is {tensor.dtype} but config.json has no quantization_config; without it the "
                "float8 values cannot be scaled back, so the checkpoint is refused"
            )
        if tensor.dtype != fp8.FP8_DTYPE:
            raise CheckpointError(f"{name} is {tensor.dtype}; FP8 checkpoints must store {fp8.FP8_DTYPE} weights")
        if tensor.dim() != 2 or not name.endswith(".weight"):
            raise CheckpointError(
                f"{name} is a float8 tensor of shape {tuple(tensor.shape)}; only 2-D linear weights may be FP8 "
                "(experts stored one by one, as Qwen's FP8 releases do)"
            )
        scale_name = name + fp8.SCALE_SUFFIX
        if scale_name not in self.files:
            raise CheckpointError(f"{name} is FP8 but the checkpoint has no {scale_name} to scale it with")
        scale = self.reader.read(self.files[scale_name], scale_name)
        block = self.quantization.weight_block_size
        want = fp8.scale_grid(tuple(tensor.shape), block)
        if tuple(scale.shape) != want or not scale.is_floating_point() or scale.dtype in fp8.FLOAT8_DTYPES:
            raise CheckpointError(
                f"{scale_name} is {scale.dtype} {tuple(scale.shape)}; a weight of shape {tuple(tensor.shape)} in "
                f"{block[0]}x{block[1]} blocks needs a float32/bfloat16 scale grid of shape {want}"
            )
        if block != fp8.BLOCK:
            raise CheckpointError(f"weight_block_size {list(block)}: only {list(fp8.BLOCK)} blocks are read")
        self.scales_read.add(scale_name)
        self.count += 1
        return scale.to(torch.float32)

    def finish(self, wanted: dict[str, str]) -> None:
        orphans = sorted(n for n in wanted if n.endswith(fp8.SCALE_SUFFIX) and n not in self.scales_read)
        if orphans:
            raise CheckpointError(
                "checkpoint does not match the config: scales without a float8 weight: " + _listing(orphans)
            )


class _ParamFiller:
    """Copies checkpoint tensors into parameters, converting expert layouts, and checks coverage."""

    def __init__(self, model: nn.Module, config: ModelConfig, tp: TensorParallel = SINGLE) -> None:
        self.params = dict(model.named_parameters())  # tied lm_head appears once, as the embedding
        self.config = config
        self.tp = tp
        self.filled: set[str] = set()
        self.unexpected: list[str] = []
        self.misshaped: list[str] = []
        self.per_expert_seen: dict[str, set[tuple[int, str]]] = defaultdict(set)

    def fill(
        self, ckpt_name: str, local: str, source, shape: tuple[int, ...], scale: torch.Tensor | None = None
    ) -> int:
        """Copy the rank's part of one checkpoint tensor (`source` a tensor or a safetensors
        slice of `shape`) into its parameter; returns the bytes read. `scale`: the tensor is an
        FP8 weight kept FP8, and this its scale grid, which goes to `<param>_scale_inv`."""
        if local == "lm_head.weight" and self.config.text.tie_word_embeddings:
            return 0  # some tied checkpoints store the copy too; the embedding is the source
        expert = _EXPERT_KEY.match(local)
        if expert:
            return self._fill_expert(ckpt_name, expert, source, shape, scale)
        param = self.params.get(local)
        if param is None:
            self.unexpected.append(ckpt_name)
            return 0
        text = self.config.text
        full = full_shape(local, tuple(param.shape), text, self.tp)
        if shape != full:
            self.misshaped.append(f"{ckpt_name}: file {shape}, model {full}")
            return 0
        if param.dtype == fp8.FP8_DTYPE and scale is None:
            self.misshaped.append(f"{ckpt_name}: not FP8, but its module's other weights are")
            return 0
        tensor = take(source, shape, shard_of(local, text, self.tp))
        param.data.copy_(tensor)
        self.filled.add(local)
        if scale is not None:
            self.params[local + fp8.SCALE_SUFFIX].data.copy_(scale)
            self.filled.add(local + fp8.SCALE_SUFFIX)
        return _nbytes(tensor)

    def _fill_expert(
        self, ckpt_name: str, match: re.Match, source, shape: tuple[int, ...], scale: torch.Tensor | None = None
    ) -> int:
        base, index, proj, fused = match.groups()
        gate_up, down = self.params.get(f"{base}.gate_up_proj"), self.params.get(f"{base}.down_proj")
        if gate_up is None or down is None:
            self.unexpected.append(ckpt_name)
            return 0
        text, tp = self.config.text, self.tp
        # Layouts are told apart by the full model's dimensions, not the rank's shard.
        num_experts, hidden, inter = text.num_experts, text.hidden_size, text.moe_intermediate_size
        first, local_experts = tp.experts(num_experts)
        local_inter = tp.expert_intermediate(inter)[1]
        if fused:
            target = gate_up if fused == "gate_up_proj" else down
            layout = _fused_layout(ckpt_name, shape, fused, num_experts, hidden, inter)
            if layout is None:
                self.misshaped.append(
                    f"{ckpt_name}: file {shape}, expected hub or transformers layout "
                    f"for E={num_experts}, H={hidden}, I={inter}"
                )
                return 0
            tensor = take(source, shape, expert_shard(fused, layout, text, tp))
            target.data.copy_(tensor.transpose(1, 2) if layout == "hub" else tensor)
            self.filled.add(f"{base}.{fused}")
            return _nbytes(tensor)
        j = int(index)
        want = (hidden, inter) if proj == "down" else (inter, hidden)
        if j >= num_experts or shape != want:
            self.misshaped.append(f"{ckpt_name}: file {shape}, expected {want} for expert < {num_experts}")
            return 0
        if not first <= j < first + local_experts:
            return 0  # another expert-parallel rank's expert: not read
        if gate_up.dtype == fp8.FP8_DTYPE and scale is None:
            # Kept FP8 as a whole module: an expert stored otherwise would be cast unscaled.
            self.misshaped.append(f"{ckpt_name}: not FP8, but the other experts of its layer are")
            return 0
        tensor = take(source, shape, per_expert_shard(proj, text, tp))
        row = j - first
        if proj == "gate":
            gate_up.data[row, :local_inter].copy_(tensor)
        elif proj == "up":
            gate_up.data[row, local_inter:].copy_(tensor)
        else:
            down.data[row].copy_(tensor)
        if scale is not None:  # FP8 kept: the grids sit as models/fp8.quantize_experts lays them out
            grid = self.params[f"{base}.{'down' if proj == 'down' else 'gate_up'}_proj{fp8.SCALE_SUFFIX}"]
            half = grid.shape[1] // 2
            rows = {"gate": slice(0, half), "up": slice(half, None), "down": slice(None)}[proj]
            grid.data[row, rows].copy_(scale)
        seen = self.per_expert_seen[base]
        seen.add((j, proj))
        if len(seen) == 3 * local_experts:
            self.filled.update({f"{base}.gate_up_proj", f"{base}.down_proj"})
            if f"{base}.gate_up_proj{fp8.SCALE_SUFFIX}" in self.params:
                self.filled.update({f"{base}.gate_up_proj{fp8.SCALE_SUFFIX}", f"{base}.down_proj{fp8.SCALE_SUFFIX}"})
        return _nbytes(tensor)

    def finish(self) -> None:
        missing = sorted(set(self.params) - self.filled)
        problems = []
        if self.misshaped:
            problems.append("mis-shaped tensors: " + _listing(self.misshaped))
        if self.unexpected:
            problems.append("unexpected tensors (not part of this model): " + _listing(self.unexpected))
        if missing:
            problems.append("missing tensors: " + _listing(missing))
        if problems:
            raise CheckpointError("checkpoint does not match the config: " + "; ".join(problems))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def full_shape(name: str, local: tuple[int, ...], text: TextConfig, tp: TensorParallel) -> tuple[int, ...]:
    """The checkpoint shape of the parameter `name` whose rank-local shape is `local`."""
    shard = shard_of(name, text, tp)
    if shard is None:
        return local
    full = list(local)
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        full[0] = text.vocab_size
    elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        full[0] = text.num_key_value_heads * text.head_dim
    else:
        full[shard.dim] = local[shard.dim] * tp.size
    return tuple(full)


def _fused_layout(name: str, shape: tuple[int, ...], which: str, e: int, h: int, i: int) -> str | None:
    """'hub' or 'transformers' for a fused expert tensor, None if it is neither."""
    if which == "gate_up_proj":
        hub, hf = (e, h, 2 * i), (e, 2 * i, h)
    else:
        hub, hf = (e, i, h), (e, h, i)
    if hub == hf and shape == hub:
        raise CheckpointError(
            f"{name} has shape {shape}, which is both the hub layout and the transformers layout because "
            f"H={h} and {'2I' if which == 'gate_up_proj' else 'I'}={hf[1]}; splitvl refuses to guess. "
            "Re-save the checkpoint with per-expert tensors, or with a hidden size that differs."
        )
    if shape == hub:
        return "hub"
    if shape == hf:
        return "transformers"
    return None


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")
