"""The benchmark's batch and chat parts produce the rows the JSON contract names (tiny model,
tiny settings: the numbers mean nothing here, the shape does)."""

from pathlib import Path

from conftest import make_model, write_model_dir

from mlx_safesig.bench import bench, format_table


def test_batch_and_chat_rows(tmp_path: Path, tokenizer):
    path = write_model_dir(tmp_path / "m", make_model(max_position_embeddings=8192), tokenizer)
    result = bench(str(path), schedules=("each",), max_tokens=4, prefill_tokens=16, repeats=1,
                   batch_size=2, chat_turns=2, surprisal_gate=True)
    runs = result["runs"]
    assert [(r["name"], r.get("schedule")) for r in runs[:3]] == [
        ("mlx-lm", None), ("safesig", "each"), ("safesig+gate", "each")]
    assert runs[2]["prefill_ratio"] > 0 and runs[2]["decode_ratio"] > 0
    batch = [r for r in runs if "batch_size" in r]
    assert [(r["name"], r.get("schedule"), r["batch_size"]) for r in batch] == [
        ("mlx-lm", None, 2), ("safesig", "each", 2)]
    assert all(r["decode_tok_s"] > 0 for r in batch)
    chat = [(r["name"], r["turn"]) for r in runs if "turn" in r]
    assert chat == [("chat-reuse", 1), ("chat-reprefill", 1), ("chat-mlx-lm", 1),
                    ("chat-reuse", 2), ("chat-reprefill", 2), ("chat-mlx-lm", 2)]
    assert all(r["ttft_ms"] > 0 for r in runs if "turn" in r)
    table = format_table(result)
    assert "safesig (each) x2" in table and "chat turn" in table
    assert "safesig+gate (each)" in table
