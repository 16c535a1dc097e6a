"""Loading safety model directories: round trip, hub path (against a local fake cache), bad input."""

import json
import shutil

import mlx.core as mx
import mlx_lm
import pytest
from conftest import make_model, write_model_dir

from mlx_safesig import SafesigError, load, score


def test_load_round_trip_gives_the_same_scores(tmp_path, tokenizer):
    model = make_model()
    path = write_model_dir(tmp_path / "m", model, tokenizer)
    loaded, tok = load(path)
    text = "Tell me a story about a robot."
    assert score(loaded, tok, text) == pytest.approx(score(model, tokenizer, text), abs=1e-6)


def test_plain_mlx_lm_load_still_loads_the_language_model(tmp_path, tokenizer):
    model = make_model()
    path = write_model_dir(tmp_path / "m", model, tokenizer)
    plain, _ = mlx_lm.load(str(path))
    ids = mx.array([[1, 50, 60, 70]])
    assert mx.allclose(plain(ids), model(ids), atol=1e-6).item()


def test_load_from_a_hub_repo_id_uses_huggingface_hub(tmp_path, tokenizer, monkeypatch):
    """The real huggingface_hub code path, offline, against a fake cache laid out like the hub's."""
    model = make_model()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-safe"
    write_model_dir(repo / "snapshots" / commit, model, tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded, tok = load("someone/tiny-safe")
    assert score(loaded, tok, "hello") == pytest.approx(score(model, tokenizer, "hello"), abs=1e-6)


def test_unknown_repo_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SafesigError, match="could not fetch someone/missing from the Hugging Face hub"):
        load("someone/missing")


def test_directory_without_safety_parts_points_to_add_safety(tmp_path, tokenizer):
    path = write_model_dir(tmp_path / "plain", make_model(), tokenizer, safety=False)
    with pytest.raises(SafesigError, match=r"has no safety parts .*add_safety=True"):
        load(path)
    model, _ = load(path, add_safety=True)  # a fresh [CLS] row and head
    assert model.cls_head.weight.shape == (1, 64)


def test_missing_safety_tensor_is_one_clear_error(tmp_path, tokenizer):
    model = make_model()
    path = write_model_dir(tmp_path / "m", model, tokenizer)
    mx.save_safetensors(str(path / "safety.safetensors"), {"cls_embed": model.cls_embed})
    with pytest.raises(SafesigError, match=r"safety.safetensors lacks cls_head.bias, cls_head.weight"):
        load(path)


def test_unknown_model_type_names_the_supported_ones(tmp_path, tokenizer):
    path = write_model_dir(tmp_path / "m", make_model(), tokenizer)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(SafesigError, match="model_type 'mamba' is not supported; supported: llama"):
        load(path)


def test_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes").mkdir()
    with pytest.raises(SafesigError, match="is not a model directory"):
        load(tmp_path / "notes")
    with pytest.raises(SafesigError, match="does not exist"):
        load(tmp_path / "nowhere")


def test_a_shape_mismatch_is_one_clear_error(tmp_path, tokenizer):
    path = write_model_dir(tmp_path / "m", make_model(), tokenizer)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_size": 96}))
    with pytest.raises(SafesigError, match="could not load"):
        load(path)
    shutil.rmtree(path)


def test_the_default_model_loads_by_its_name(tmp_path, tokenizer, monkeypatch):
    from mlx_safesig import DEFAULT_MODEL, loading

    path = write_model_dir(tmp_path / "default", make_model(), tokenizer)
    monkeypatch.setattr(loading, "default_model_path", lambda progress=None: path)
    by_name, tok = load(DEFAULT_MODEL)
    by_default, _ = load()
    assert score(by_name, tok, "hello") == score(by_default, tok, "hello")


def test_a_fresh_head_says_so_on_stderr_and_trained_adapters_silence_it(tmp_path, tokenizer,
                                                                          capsys):
    from mlx_safesig.adapters import save_adapters
    from mlx_safesig.train import TrainConfig, prepare_model

    path = write_model_dir(tmp_path / "plain", make_model(), tokenizer, safety=False)
    load(path, add_safety=True)
    assert capsys.readouterr().err == (
        f"warning: the safety head of {path} is untrained (random): its verdicts mean nothing "
        "until it is trained with `mlx-safesig train`.\n")
    model, config = make_model(), TrainConfig(num_layers=1)
    save_adapters(model, tmp_path / "ad", config, prepare_model(model, config))
    load(path, adapter_path=tmp_path / "ad")
    assert capsys.readouterr().err == ""
