"""The README opens with the two commands, and CI runs the second one."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```")
    return [blocks[i].split("\n", 1)[1].strip() for i in (1, 3)]


def test_readme_opens_with_install_and_test_commands():
    main, tests = readme_commands()
    assert main.startswith("pip install -e . && mlx-safesig ")
    assert tests == 'pip install -e ".[test]" && python -m pytest'


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci
