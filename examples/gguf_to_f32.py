"""Rewrite a k-quant GGUF (Q4_K_M and the like) as an all-F32 GGUF that `mlx-safesig convert` reads.

MLX's GGUF reader (and so our converter) loads only F32/F16/Q4_0/Q4_1/Q8_0 tensors; llama.cpp's
k-quants (Q4_K, Q5_0, Q6_K, ...) make it fail with "gguf_tensor_to_f16 failed". The `gguf` package
(a test extra) dequantizes every type in numpy; metadata (hyperparameters, tokenizer, chat
template) is copied unchanged, so the converter rebuilds the model and tokenizer as usual:

    python examples/gguf_to_f32.py model-Q4_K_M.gguf model-f32.gguf
    mlx-safesig convert --hf-path model-f32.gguf --mlx-path out_dir

The weights are the quantized model's, exactly (dequantized), not the original float ones.
"""

import argparse
import sys

import gguf
import numpy as np


def dequantize_gguf(src: str, dst: str) -> None:
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # the writer writes these itself
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if key == "general.file_type":
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for n, t in enumerate(reader.tensors):
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, np.ascontiguousarray(data))
        if (n + 1) % 50 == 0 or n + 1 == len(reader.tensors):
            print(f"dequantized {n + 1}/{len(reader.tensors)} tensors", file=sys.stderr, flush=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    a = p.parse_args()
    dequantize_gguf(a.src, a.dst)
