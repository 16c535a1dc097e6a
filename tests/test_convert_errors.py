"""Hostile and broken input: each is refused with one sentence naming the problem, and nothing
is left beside the output path."""

import json
import os
import pickle
import zipfile

import pytest
from click.testing import CliRunner
from mlx_safesig.convert import ConvertError, convert
from test_convert_support import HIDDEN, make_hf_folder, torch

from mlx_safesig.cli import main


def refused(src, out, match, **kwargs):
    with pytest.raises(ConvertError, match=match) as e:
        convert(src, out, progress=False, **kwargs)
    assert "\n" not in str(e.value)
    assert not out.exists()
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return str(e.value)


class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_whose_pickle_would_run_a_command_is_refused_unrun(tmp_path):
    src = make_hf_folder(tmp_path / "hf", fmt="bin")
    marker = tmp_path / "pwned"
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["model.norm.weight"] = RunsACommand(marker)
    torch.save(state, src / "pytorch_model.bin")
    message = refused(src, tmp_path / "mlx", r"refused pickle global (posix|os)\.system")
    assert "pytorch_model.bin" in message
    assert not marker.exists()


def _bin_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")


def test_bin_with_an_unexpected_reduce_is_refused(tmp_path):
    src = make_hf_folder(tmp_path / "hf", fmt="bin")
    # calls torch.FloatStorage("x") -- a global we know, used in a way a state dict never does
    payload = b"\x80\x02ctorch\nFloatStorage\nX\x01\x00\x00\x00x\x85R."
    _bin_with_pickle(src / "pytorch_model.bin", payload)
    refused(src, tmp_path / "mlx", r"pytorch_model\.bin: unexpected pickle content")


def test_bin_with_builtins_eval_is_refused(tmp_path):
    src = make_hf_folder(tmp_path / "hf", fmt="bin")
    payload = pickle.dumps((eval, ("1",)), protocol=4)[:-1] + b"R."
    _bin_with_pickle(src / "pytorch_model.bin", payload)
    refused(src, tmp_path / "mlx", r"refused pickle global builtins\.eval")


def test_truncated_safetensors_is_refused(tmp_path):
    src = make_hf_folder(tmp_path / "hf")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    refused(src, tmp_path / "mlx", r"model\.safetensors: truncated safetensors file")


def test_config_and_tensor_shapes_that_disagree_are_refused(tmp_path):
    src = make_hf_folder(tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(config))
    refused(
        src,
        tmp_path / "mlx",
        r"tensor model\.layers\.0\.mlp\.\w+\.weight has shape .* "
        r"but config\.json implies",
    )


def test_missing_tokenizer_is_refused(tmp_path):
    src = make_hf_folder(tmp_path / "hf")
    (src / "tokenizer.json").unlink()
    refused(src, tmp_path / "mlx", r"hf: no tokenizer")


def test_head_with_the_wrong_hidden_size_is_refused(tmp_path):
    src = make_hf_folder(tmp_path / "hf", fmt="bin")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["cls_head.weight"] = torch.zeros(1, HIDDEN // 2)
    torch.save(state, src / "pytorch_model.bin")
    refused(
        src,
        tmp_path / "mlx",
        rf"head cls_head\.weight has shape \[1, {HIDDEN // 2}\], "
        rf"expected \[1 or 2, {HIDDEN}\]",
    )


def test_unknown_architecture_is_refused_naming_the_supported_ones(tmp_path):
    src = make_hf_folder(tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(config))
    refused(
        src,
        tmp_path / "mlx",
        r"model_type 'gpt2' is not supported "
        r"\(supported: llama, mistral, qwen2, qwen3\)",
    )


@pytest.mark.parametrize("fmt", ["sharded-safetensors", "sharded-bin"])
def test_index_naming_a_missing_shard_is_refused(tmp_path, fmt):
    src = make_hf_folder(tmp_path / "hf", fmt=fmt)
    shard = sorted(src.glob("*-00002-of-00004.*"))[0]
    shard.unlink()
    refused(src, tmp_path / "mlx", rf"names shard {shard.name}, which does not exist")


def test_cls_row_without_a_head_is_refused(tmp_path):
    src = make_hf_folder(tmp_path / "hf", fmt="bin")
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    del state["cls_head.weight"], state["cls_head.bias"]
    torch.save(state, src / "pytorch_model.bin")
    refused(src, tmp_path / "mlx", r"has a \[CLS\] row but no head")


def test_existing_output_is_left_alone(tmp_path):
    src = make_hf_folder(tmp_path / "hf")
    (tmp_path / "mlx").mkdir()
    (tmp_path / "mlx" / "keep").write_text("mine")
    with pytest.raises(ConvertError, match="already exists"):
        convert(src, tmp_path / "mlx", progress=False)
    assert (tmp_path / "mlx" / "keep").read_text() == "mine"


def test_failure_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    from mlx_safesig.convert import pipeline

    src = make_hf_folder(tmp_path / "hf", fmt="sharded-safetensors")
    calls = []

    def flaky(folder, name, tensors, real=pipeline.write_shard):
        calls.append(name)
        if len(calls) == 3:
            raise ConvertError("disk gave up.")
        return real(folder, name, tensors)

    monkeypatch.setattr(pipeline, "write_shard", flaky)
    refused(src, tmp_path / "out" / "nested" / "mlx", "disk gave up")
    assert not (tmp_path / "out").exists()  # parents it created are gone too


def test_cli_error_is_one_sentence_and_exit_1(tmp_path):
    src = make_hf_folder(tmp_path / "hf")
    (src / "tokenizer.json").unlink()
    result = CliRunner().invoke(
        main, ["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "mlx")]
    )
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last == f"Error: {src}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json)."
    assert "Traceback" not in result.output
    assert not (tmp_path / "mlx").exists()
