"""`bench --server`: mlx_lm.server and `mlx-safesig server` on the same model directory, each in
its own process on loopback, give the rows the JSON contract names (tiny model: the shape counts,
not the numbers)."""

from pathlib import Path

from conftest import write_model_dir
from test_server import endless_model

from mlx_safesig.bench import bench, format_table


def test_server_rows_time_both_servers_on_the_same_model(tmp_path: Path, tokenizer):
    path = write_model_dir(tmp_path / "m", endless_model(max_position_embeddings=8192), tokenizer)
    result = bench(str(path), schedules=("annealing",), max_tokens=6, prefill_tokens=16,
                   repeats=1, server_concurrency=2)
    servers = [r for r in result["runs"] if "concurrency" in r]
    assert [(r["name"], r["concurrency"]) for r in servers] == [("mlx_lm.server", 2),
                                                               ("safesig-server", 2)]
    assert servers[1]["schedule"] == "annealing"
    assert all(set(r) <= {"name", "concurrency", "tok_s", "schedule"} and r["tok_s"] > 0
               for r in servers)
    assert "safesig-server c2" in format_table(result)
