"""Machine-translated sources: ``python -m mlx_safesig.align.build --translate es,fr``.

No pinned package ships harmful requests in Spanish, French or German, so the builder can make them
with Apertium (rule-based machine translation, deterministic for a given package version), run as a
subprocess (``apertium -u MODE``, a list argv, many rows per call):

* Spanish: ``eng-spa`` (Debian ``apertium-eng-spa``);
* French: English -> Spanish -> French (``eng-spa``, then ``es-fr`` of ``apertium-fr-es``): there is
  no English -> French pair, and the pivot is noticeably worse than the Spanish;
* German: no English -> German pair exists (none in Debian), so German is not offered.

For each language it writes (a) a share of every training source's rows (``--translate-share``,
picked by a hash of the row id) as the training source ``<source>_<lang>``, in the split of its
English original, and (b) every row of the held-out sources in HELDOUT_TRANSLATED as the held-out
source ``<source>_<lang>``. A translated row keeps its original's label and fields (not its English
``response`` / ``reference`` answer) and adds ``lang``, ``translated_from`` (the English row's id)
and ``translator`` (``apertium eng-spa 0.8.1-2``).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import replace

from .archive import BuildError
from .records import make_row

# lang -> the Apertium steps from English: (mode, Debian package)
LANGS = {"es": (("eng-spa", "apertium-eng-spa"),),
         "fr": (("eng-spa", "apertium-eng-spa"), ("es-fr", "apertium-fr-es"))}
NO_PAIR = {"de": "Apertium has no English->German pair (Debian ships none), so German stays "
                 "untranslated"}
# the English held-out prompt sources also written translated (the ChatterBot ones are already
# natively Spanish, French and German)
HELDOUT_TRANSLATED = ("harmbench", "jbb_tense", "strongreject", "senator_search", "kto_en_demo",
                      "dpo_en_demo")
# training sources not translated: obfuscated spellings (leetspeak) come back mostly unchanged
NOT_TRANSLATED = ("harmactions_obfuscated",)
DEFAULT_SHARE = 0.15
SHARE_SALT = "mlx-safesig-translate-v1"
DROPPED = ("id", "text", "source", "split", "response", "reference")  # re-made, or English answers
BATCH = 2000  # lines per apertium call
SEPARATOR = "\n\n"  # between lines fed to apertium: it keeps a blank line as it is
INSTALL = ("apt-get install {pkg} (Debian/Ubuntu), or see "
           "https://wiki.apertium.org/wiki/Installation")
METHOD = ("apertium -u MODE over the row's lines (one line per blank-line-separated segment, many "
          "rows per call, the segment count checked), unknown-word marks (*, #, @) the English "
          "text did not hold removed, then the builder's normalization; French pivots through "
          "Spanish")


def parse_langs(value: str) -> tuple[str, ...]:
    """``--translate``'s comma-separated languages, checked; "" is none."""
    langs = tuple(dict.fromkeys(x.strip() for x in value.split(",") if x.strip()))
    for lang in langs:
        if lang in NO_PAIR:
            raise BuildError(f"--translate {lang}: {NO_PAIR[lang]}")
        if lang not in LANGS:
            raise BuildError(f"--translate: unknown language {lang!r}; choose from "
                             f"{', '.join(LANGS)}")
    return langs


def translated_name(source: str, lang: str) -> str:
    return f"{source}_{lang}"


def translatable(src) -> bool:
    """Is the registry entry ``src`` one ``--translate`` writes translated?"""
    if src.kind != "prompt" or src.translated_from or src.lang != "en":
        return False
    return src.name in HELDOUT_TRANSLATED if src.role == "heldout" else src.name not in NOT_TRANSLATED


def translated_sources(sources) -> list:
    """The registry entries (``sources.Source``) of every translated source, for the card's
    license table and the roles: a translation keeps its original's license, label and role."""
    out = []
    for lang, steps in LANGS.items():
        modes = " then ".join(m for m, _ in steps)
        for s in filter(translatable, sources):
            out.append(replace(s, name=translated_name(s.name, lang), translated_from=s.name,
                               keep=s.keep + ("lang", "translated_from", "translator"),
                               origin=f"machine-translated with Apertium ({modes}) from "
                                      f"{s.name}: {s.origin}"))
    return out


def in_share(row_id: str, lang: str, share: float) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{SHARE_SALT}:{lang}:{row_id}".encode()).digest()[:8], "big")
    return h / 2.0**64 < share


def _first_line(text: str) -> str:
    return next((ln for ln in text.splitlines() if ln.strip()), "")[:200]


class Apertium:
    """The ``apertium`` on PATH, checked for the modes ``langs`` need before anything is read."""

    def __init__(self, langs: tuple[str, ...]):
        self.langs = langs
        self.exe = shutil.which("apertium")
        modes = set(self._run(["-l"]).split()) if self.exe else set()
        for lang in langs:
            for k, (mode, pkg) in enumerate(LANGS[lang]):
                if mode not in modes:
                    via = " (French goes through Spanish)" if k else ""
                    raise BuildError(f"--translate {lang} needs Apertium's {mode} mode{via}: "
                                     + INSTALL.format(pkg=pkg))
        self.packages = {pkg: _package_version(pkg) for lang in langs for _, pkg in LANGS[lang]}
        self.version = (self._run(["-V"]).strip() or "?").splitlines()[0]

    def describe(self, lang: str) -> str:
        """The ``translator`` of ``lang``'s rows: ``apertium eng-spa 0.8.1-2 + es-fr 0.9.4-1``."""
        return "apertium " + " + ".join(f"{m} {self.packages[p]}" for m, p in LANGS[lang])

    def _run(self, args: list[str], text: str = "") -> str:
        try:
            r = subprocess.run([self.exe, *args], input=text, capture_output=True, text=True,
                               timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BuildError(f"apertium {' '.join(args)} failed: {e}") from None
        if r.returncode != 0:
            raise BuildError(f"apertium {' '.join(args)} failed (exit {r.returncode}): "
                             f"{_first_line(r.stderr) or 'no message'}")
        return r.stdout

    def lines(self, mode: str, lines: list[str]) -> list[str]:
        """Each one-line, non-blank string of ``lines`` through ``mode``, in order. A batch whose
        output does not split back into as many lines is halved until it does."""
        out: list[str] = []
        for i in range(0, len(lines), BATCH):
            out += self._batch(mode, lines[i:i + BATCH])
        return out

    def _batch(self, mode: str, lines: list[str]) -> list[str]:
        got = self._run(["-u", mode], SEPARATOR.join(lines) + "\n").rstrip("\n").split(SEPARATOR)
        if len(got) == len(lines) and not any("\n" in g for g in got):
            return [_unmarked(g, src) for g, src in zip(got, lines)]
        if len(lines) == 1:
            return [_unmarked(" ".join(" ".join(got).split()), lines[0])]
        half = len(lines) // 2
        return self._batch(mode, lines[:half]) + self._batch(mode, lines[half:])

    def texts(self, lang: str, texts: list[str]) -> list[str]:
        """``texts`` (multi-line rows) translated into ``lang``, line by line (blank lines kept)."""
        split = [t.split("\n") for t in texts]
        todo = [ln for lines in split for ln in lines if ln.strip()]
        for mode, _ in LANGS[lang]:
            todo = self.lines(mode, todo)
        it = iter(todo)
        return ["\n".join(next(it) if ln.strip() else ln for ln in lines) for lines in split]


def _unmarked(out: str, source: str) -> str:
    """Apertium's marks before a word (``*`` unknown, ``#`` not generated, ``@`` not transferred)
    dropped, unless the input line held that character itself."""
    for mark in "*#@":
        if mark not in source:
            out = re.sub(rf"(?<!\w){re.escape(mark)}(?=\w)", "", out)
    return out


def _package_version(pkg: str) -> str:
    exe = shutil.which("dpkg-query")
    if not exe:
        return "version unknown"
    try:
        r = subprocess.run([exe, "-W", "-f=${Version}", pkg], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "version unknown"
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "version unknown"


def translate_rows(rows: list[dict], apertium: Apertium, lang: str) -> list[dict]:
    """``rows`` translated into ``lang``: source ``<source>_<lang>``, a new id, the original's other
    fields but DROPPED's, plus ``lang``, ``translated_from`` and ``translator``."""
    texts = apertium.texts(lang, [r["text"] for r in rows])
    who = apertium.describe(lang)
    out = []
    for r, t in zip(rows, texts):
        extra = {k: v for k, v in r.items() if k not in DROPPED + ("license", "non_commercial")}
        out.append(make_row(t, translated_name(r["source"], lang), **extra, lang=lang,
                            translated_from=r["id"], translator=who))
    return out


def translate_heldout(heldout: list[dict], apertium: Apertium) -> list[dict]:
    """Every row of the HELDOUT_TRANSLATED sources in ``heldout``, in each language."""
    rows = [r for r in heldout if r["source"] in HELDOUT_TRANSLATED]
    return [t for lang in apertium.langs for t in translate_rows(rows, apertium, lang)]


def translate_training(rows: list[dict], apertium: Apertium, share: float, sources: dict
                       ) -> list[dict]:
    """About ``share`` of the rows of each translatable training source (``sources``: the
    registry; by a hash of the id and the language: another share per language), in each
    language."""
    out = []
    for lang in apertium.langs:
        chosen = [r for r in rows if translatable(sources[r["source"]])
                  and in_share(r["id"], lang, share)]
        out += translate_rows(chosen, apertium, lang)
    return out
