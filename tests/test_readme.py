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


def test_readme_is_short_and_says_the_default_model_is_non_commercial_before_any_section():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    before_sections = text.split("\n## ", 1)[0]
    assert "non-commercial" in before_sections and "MODEL_CARD.md" in before_sections
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in before_sections


def test_model_card_names_sources_and_keeps_a_held_out_section():
    card = (ROOT / "MODEL_CARD.md").read_text()
    for title in ("## Base model", "## Data and licenses", "## Intended use", "## Decoding defaults",
                  "## Measured numbers (dev split)", "## Limits", "## Held-out sources"):
        assert title in card
    assert "CC BY-NC 4.0" in card
