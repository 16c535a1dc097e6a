"""`mlx-safesig convert` as a click command: a thin skin over `convert()`."""

from click.testing import CliRunner
from test_convert_support import make_hf_folder

from mlx_safesig.cli import main

OPTIONS = {
    "--hf-path",
    "--mlx-path",
    "--quantize",
    "--q-bits",
    "--dtype",
    "--add-safety",
    "--head-key",
    "--verify",
}


def test_command_has_exactly_the_documented_options_each_with_help():
    params = [p for p in main.commands["convert"].params if p.name != "help"]
    assert {max(p.opts, key=len) for p in params} == OPTIONS
    assert "-q" in next(p for p in params if p.name == "quantize").opts
    assert all(p.help for p in params)


def test_command_converts_and_reports_progress_on_stderr(tmp_path):
    src = make_hf_folder(tmp_path / "hf")
    result = CliRunner().invoke(
        main,
        [
            "convert",
            "--hf-path",
            str(src),
            "--mlx-path",
            str(tmp_path / "mlx"),
            "-q",
            "--q-bits",
            "8",
            "--verify",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr and "verify: max |logits diff|" in result.stderr
    assert (tmp_path / "mlx" / "safety.safetensors").is_file()


def test_hf_path_takes_a_hub_repo_id(tmp_path, monkeypatch):
    import huggingface_hub

    src = make_hf_folder(tmp_path / "snapshot")
    asked = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        asked.append((repo_id, allow_patterns))
        return str(src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    result = CliRunner().invoke(
        main, ["convert", "--hf-path", "someone/tiny-model", "--mlx-path", str(tmp_path / "mlx")]
    )
    assert result.exit_code == 0, result.output
    assert asked[0][0] == "someone/tiny-model"
    assert {"*.json", "*.safetensors", "*.bin"} <= set(asked[0][1])
    assert (tmp_path / "mlx" / "safety.safetensors").is_file()


def test_a_hub_id_that_cannot_be_fetched_is_one_sentence(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, revision=None, allow_patterns=None):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    result = CliRunner().invoke(
        main, ["convert", "--hf-path", "someone/tiny-model", "--mlx-path", str(tmp_path / "mlx")]
    )
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "Error: could not fetch someone/tiny-model from the Hugging Face hub (ConnectionError).")
    assert not (tmp_path / "mlx").exists()
