"""The tokenizer files a converted folder carries, and the `[CLS]` token in them."""

import json
from pathlib import Path

from .errors import ConvertError

CLS_TOKEN = "[CLS]"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)
# any one of these makes a loadable tokenizer
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def tokenizer_files(folder: Path) -> dict[str, Path]:
    """File name -> path of the tokenizer files in `folder`; none usable is an error."""
    files = {n: folder / n for n in TOKENIZER_FILES if (folder / n).is_file()}
    if not any(n in files for n in TOKENIZER_MODELS):
        raise ConvertError(
            f"{folder}: no tokenizer (tokenizer.json, tokenizer.model or vocab.json)."
        )
    return files


def _json(file: "Path | str") -> dict:
    text = file.read_text() if isinstance(file, Path) else file
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ConvertError(f"{file}: not valid JSON.") from None


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def cls_token_id(files: dict[str, "Path | str"]) -> int | None:
    """The id of the tokenizer's `cls_token`, or None when it declares none.

    The token is named in tokenizer_config.json or special_tokens_map.json; its id comes from
    tokenizer.json (added tokens, then the model vocabulary) or added_tokens.json.
    """
    name = None
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        if f in files and name is None:
            name = _content(_json(files[f]).get("cls_token"))
    if name is None:
        return None
    if "tokenizer.json" in files:
        tok = _json(files["tokenizer.json"])
        for added in tok.get("added_tokens", []):
            if added.get("content") == name:
                return int(added["id"])
        vocab = tok.get("model", {}).get("vocab")
        if isinstance(vocab, dict) and name in vocab:
            return int(vocab[name])
    if "added_tokens.json" in files and name in _json(files["added_tokens.json"]):
        return int(_json(files["added_tokens.json"])[name])
    raise ConvertError(f"tokenizer: cls_token {name!r} has no id in the tokenizer files.")


def with_cls_token(files: dict[str, "Path | str"], cls_id: int) -> dict[str, "Path | str"]:
    """The tokenizer files with `[CLS]` added as a special token with id `cls_id` and declared as
    the `cls_token` (files not changed stay paths, changed ones become text)."""
    from tokenizers import AddedToken, Tokenizer

    if "tokenizer.json" not in files:
        raise ConvertError("tokenizer: --add-safety needs a tokenizer.json to add [CLS] to.")
    tokenizer_json = files["tokenizer.json"]
    text = tokenizer_json.read_text() if isinstance(tokenizer_json, Path) else tokenizer_json
    tokenizer = Tokenizer.from_str(text)
    if tokenizer.token_to_id(CLS_TOKEN) is not None:
        raise ConvertError(f"tokenizer: already has a {CLS_TOKEN} token.")
    tokenizer.add_special_tokens([AddedToken(CLS_TOKEN, special=True, normalized=False)])
    got = tokenizer.token_to_id(CLS_TOKEN)
    if got != cls_id:
        raise ConvertError(
            f"tokenizer: {CLS_TOKEN} would get id {got}, but the embedding's next row is {cls_id}."
        )
    out = dict(files)
    out["tokenizer.json"] = tokenizer.to_str(pretty=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = _json(files[name]) if name in files else {}
        config["cls_token"] = CLS_TOKEN
        if "added_tokens_decoder" in config:
            config["added_tokens_decoder"][str(cls_id)] = {
                "content": CLS_TOKEN,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        out[name] = json.dumps(config, indent=2, ensure_ascii=False)
    return out
