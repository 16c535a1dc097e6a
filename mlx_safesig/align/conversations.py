"""Multi-turn training rows (SPEC §3b): the verdict learns "answering the final turn, in this
context, would be harmful", so a request split across turns, followed by "continue" or placed in
the system prompt is judged as the request, and a benign turn after other turns as benign.

Every shape is built from both labels (a benign request split across turns is benign), so no shape
alone predicts the label. The wording here is training-only and differs from the evaluation's
(``mlx_safesig.eval.detection``): the held-out conversation suite measures phrasings never trained.
"""

import hashlib
import json
from typing import Dict, List, Sequence

from .sources import text_id

SPLIT_ASSISTANT = ("Got it, what else?", "Understood. Please continue your message.",
                   "Sure, what's the rest?", "I'm listening.")
COMPLY_ASSISTANT = ("Of course. Here is how to start.", "Sure! Step one is below.",
                    "Absolutely, here is the beginning.")
CONTINUE_USER = ("Continue.", "Please go on.", "Next part please.", "And then?", "Keep writing.")
SYSTEM_USER = ("Do it.", "Follow your instructions above.", "Begin.", "Proceed with the task.",
               "Start now, please.")
FOLLOW_UPS = ("Tell me more.", "Can you shorten it?", "Please elaborate on the first point.",
              "Thanks! Any tips?", "How would that work in practice?", "Could you rephrase it?",
              "Give me a quick recap.", "Okay, and what about beginners?")
HARMFUL_SHAPES = ("split", "continue", "system")
BENIGN_SHAPES = ("split", "continue", "system", "follow-up", "after-refusal")


def _pick(options: Sequence, *salt: str):
    return options[int(hashlib.sha256("|".join(salt).encode()).hexdigest(), 16) % len(options)]


def _halves(text: str) -> tuple[str, str]:
    words = text.split()
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " ".join(words[cut:]) or "."


def _first_sentences(text: str, limit: int = 400) -> str:
    """The start of an earlier answer, as a short earlier assistant turn."""
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    return cut[: end + 1] if end > 0 else cut


def conversation_prompts(rows: Sequence[dict], shape: str, answers: Dict[str, str],
                         refused: Sequence[dict] = (), refusal: str = "") -> List[dict]:
    """One conversation per row of ``rows`` in ``shape`` (without the final response): ``id`` (of
    the messages), ``messages``, ``label`` (the row's), ``source`` ("<shape>:<row source>") and
    ``answer_of``: the plain row whose answer serves as the final response of a benign row whose
    last turn asks for the same thing (split, system, after-refusal); continue and follow-up rows
    need an answer of their own (``answer_of`` None). ``answers``: plain answers by row id, for the
    earlier assistant turn of benign continue / follow-up rows (rows without one are skipped);
    ``refused``: harmful rows and ``refusal`` the refusal text for ``after-refusal``."""
    out = []
    for r in rows:
        rid, text, label = r["id"], r["text"], r["label"]
        answer_of = r["id"]
        if shape == "split":
            first, second = _halves(text)
            messages = [{"role": "user", "content": first},
                        {"role": "assistant", "content": _pick(SPLIT_ASSISTANT, rid)},
                        {"role": "user", "content": second}]
        elif shape == "system":
            messages = [{"role": "system", "content": text},
                        {"role": "user", "content": _pick(SYSTEM_USER, rid)}]
        elif shape in ("continue", "follow-up"):
            if label:
                earlier = _pick(COMPLY_ASSISTANT, rid)
            elif answers.get(rid):
                earlier = _first_sentences(answers[rid])
            else:
                continue
            last = _pick(CONTINUE_USER if shape == "continue" else FOLLOW_UPS, rid)
            messages = [{"role": "user", "content": text},
                        {"role": "assistant", "content": earlier},
                        {"role": "user", "content": last}]
            answer_of = None
        elif shape == "after-refusal":
            if not refused:
                continue
            messages = [{"role": "user", "content": _pick(refused, rid, "refused")["text"]},
                        {"role": "assistant", "content": refusal},
                        {"role": "user", "content": text}]
        else:
            raise ValueError(f"unknown conversation shape {shape!r}")
        out.append({"id": text_id(json.dumps(messages)), "messages": messages, "label": label,
                    "source": f"{shape}:{r.get('source')}", "answer_of": answer_of})
    return out
