"""Writing the MLX folder: atomically (temp dir beside the destination, renamed at the end)."""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import save_config

from .errors import ConvertError
from .quantize import as_saved


@contextlib.contextmanager
def atomic_directory(dest: Path):
    """Yield a fresh temporary directory beside `dest` that becomes `dest` only if the block
    finishes; on any failure it is removed, along with parent folders this call created."""
    dest = Path(dest)
    if dest.exists():
        raise ConvertError(f"{dest}: already exists; remove it or pick another --mlx-path.")
    created = [p for p in reversed(dest.parents) if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(created):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def write_shard(folder: Path, name: str, tensors: dict) -> dict[str, int]:
    """Save `tensors` (arrays or `Quantized`) as `folder/name`; returns saved key -> bytes."""
    flat = {}
    for key, t in tensors.items():
        flat.update(as_saved(key, t))
    mx.save_safetensors(str(folder / name), flat, metadata={"format": "mlx"})
    return {key: a.nbytes for key, a in flat.items()}


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The `model.safetensors.index.json` that maps each tensor to its shard."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def write_config(folder: Path, config: dict) -> None:
    """config.json as mlx-lm writes it (sorted; `quantization_config` mirrors `quantization`)."""
    save_config(dict(config), folder / "config.json")


def write_files(folder: Path, files: dict[str, "Path | str"]) -> None:
    """Copy (`Path`) or write (`str`) each named file into `folder`."""
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, folder / name)
        else:
            (folder / name).write_text(content)
