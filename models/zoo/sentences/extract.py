"""Extract the bundled English sentences used for calibration and held-out evaluation.

Real prose, no download: CPython's bundled documentation topics (``pydoc_data``) and
scikit-learn's dataset descriptions. Run from the repo root to regenerate ``sentences.txt``:

    python models/zoo/sentences/extract.py
"""

from __future__ import annotations

import random
import re
from pathlib import Path

_UNWANTED = re.compile(r"[{}<>=\[\]|*_`\\#]|\.\.\.|>>>|::|https?:|\d\.\d\.\d")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“])")


def _prose() -> list[str]:
    from pydoc_data.topics import topics

    texts = list(topics.values())
    import sklearn.datasets

    descr = Path(sklearn.datasets.__file__).parent / "descr"
    texts += [p.read_text(encoding="utf-8") for p in sorted(descr.glob("*.rst"))]
    return texts


def clean_sentences(text: str) -> list[str]:
    """The sentences of ``text`` that are clean prose: 40..300 characters, at least 7 words,
    starting upper-case, ending in . ! or ?, and free of markup, code and URLs."""
    found = []
    for raw in _SPLIT.split(re.sub(r"\s+", " ", text)):
        sentence = raw.strip()
        if not 40 <= len(sentence) <= 300 or sentence.count(" ") < 6:
            continue
        if _UNWANTED.search(sentence) or sentence[-1] not in ".!?" or not sentence[0].isupper():
            continue
        found.append(sentence)
    return found


def sentences() -> list[str]:
    """Every distinct clean sentence of the bundled prose, shuffled with a fixed seed."""
    found = [s for text in _prose() for s in clean_sentences(text)]
    unique = list(dict.fromkeys(found))
    random.Random(0).shuffle(unique)
    return unique


if __name__ == "__main__":
    out = Path(__file__).with_name("sentences.txt")
    lines = sentences()
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} sentences to {out}")
