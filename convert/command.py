"""`mlx-safesig convert`: a thin click skin over `convert()`."""

import click

from .errors import ConvertError
from .pipeline import DTYPES, convert


@click.command("convert")
@click.option(
    "--hf-path",
    required=True,
    type=click.Path(),
    help="Source: an HF or mlx-lm model folder, "
    "or a llama-family .gguf file (or a folder holding one).",
)
@click.option(
    "--mlx-path", required=True, type=click.Path(), help="Output folder (must not exist)."
)
@click.option(
    "-q",
    "--quantize",
    is_flag=True,
    help="Quantize the language model's matrices (never the "
    "head, the [CLS] row or norms); a GGUF keeps its own quantization.",
)
@click.option(
    "--q-bits",
    type=click.Choice(["4", "8"]),
    default="4",
    show_default=True,
    help="Bits per weight with -q (group size 64).",
)
@click.option(
    "--dtype",
    type=click.Choice(list(DTYPES)),
    default=None,
    help="Float type of the output (default: keep the source's; GGUF: float32).",
)
@click.option(
    "--add-safety",
    is_flag=True,
    help="Give a plain model a fresh [CLS] row and safety head, ready for training.",
)
@click.option(
    "--head-key",
    default=None,
    help="Name of the safety head's tensors if not cls_head, "
    "safety_head, classifier or score (e.g. my_head for my_head.weight / my_head.bias).",
)
@click.option(
    "--verify",
    is_flag=True,
    help="Compare logits (and score) with a PyTorch reference "
    "afterwards (needs torch and transformers).",
)
def convert_command(hf_path, mlx_path, quantize, q_bits, dtype, add_safety, head_key, verify):
    """Convert a PyTorch / Hugging Face or GGUF checkpoint into an mlx-safesig model folder."""
    try:
        convert(
            hf_path,
            mlx_path,
            quantize=quantize,
            q_bits=int(q_bits),
            dtype=dtype,
            add_safety=add_safety,
            head_key=head_key,
            verify=verify,
        )
    except ConvertError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # disk full, permissions: still one sentence, no traceback
        raise click.ClickException(f"{e.filename or mlx_path}: {e.strerror or e}.") from None
