"""The demo `splitvl up` serves when no model is given: a tiny random Qwen3-VL-MoE checkpoint,
built once into the cache directory, and a demo image for the example request it prints."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_NAME = "splitvl-tiny"
# What `splitvl up` runs with neither --config nor --model (configs/tiny-cpu.yaml links to it).
DEMO_CONFIG = Path(__file__).with_name("tiny-cpu.yaml")


def cache_dir(override: str | Path | None = None) -> Path:
    """--cache-dir, else $SPLITVL_CACHE, else ~/.cache/splitvl."""
    chosen = override or os.environ.get("SPLITVL_CACHE") or Path.home() / ".cache" / "splitvl"
    path = Path(chosen).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _generator_key() -> str:
    """A hash of the code that writes the checkpoint: a cached one from older code is not reused."""
    import models.tiny_checkpoint
    import models.tiny_tokenizer

    digest = hashlib.sha256()
    for module in (models.tiny_checkpoint, models.tiny_tokenizer):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:12]


def tiny_checkpoint_path(cache: Path) -> Path:
    """Where the tiny checkpoint of this code version lives (it may not be written yet)."""
    return cache / f"tiny-qwen3-vl-moe-{_generator_key()}"


def tiny_checkpoint(cache: Path) -> Path:
    """The cached tiny checkpoint, written first if missing (safe when several launchers race)."""
    from models.tiny_checkpoint import write_tiny_checkpoint

    target = tiny_checkpoint_path(cache)
    if target.is_dir():
        return target
    # Write beside it, then rename: a half-written directory is never seen under the final name.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=cache))
    try:
        write_tiny_checkpoint(staging)
        staging.rename(target)
    except OSError:
        if not target.is_dir():  # not "another launcher got there first"
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def demo_image(cache: Path) -> Path:
    """A 256x256 PNG the printed example request sends."""
    from PIL import Image

    path = cache / "demo.png"
    if not path.is_file():
        staging = cache / f".demo-{os.getpid()}.png"
        Image.radial_gradient("L").convert("RGB").save(staging)
        staging.replace(path)
    return path
