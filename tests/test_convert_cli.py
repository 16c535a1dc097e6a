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
