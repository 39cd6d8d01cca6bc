"""Bounded text: long texts are cut before tokenizing, to exactly the tokens the whole text gives;
batches of text run in chunks that stop once nobody waits."""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import pytest
from edgec.models.data import bundled_sentences
from edgec.runtimes import load_package
from edgec.runtimes.manifest import TextPreprocessing
from edgec.runtimes.processing import PROBE_CHARS_PER_TOKEN, TextEncoder
from edgec.runtimes.server.batching import Abandoned
from edgec.runtimes.server.text import answer_texts, chunks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

from edgec.errors import InputError

MAX_LENGTH = 16  # small, so that hypothesis's texts overflow it often and probes must grow


def _bpe(sentences: list[str]) -> Tokenizer:
    """Byte-level BPE, as GPT-2 and RoBERTa tokenize: regex splits that keep their spaces."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(sentences, trainer)
    tokenizer.post_processor = TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    return tokenizer


def _unigram(sentences: list[str]) -> Tokenizer:
    """SentencePiece-style Unigram over NFKC-normalized Metaspace words, as T5 and XLM-R do."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tokenizer.train_from_iterator(sentences, trainer)
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer_files(minilm_package, tmp_path_factory) -> dict[str, Path]:
    """tokenizer.json of three families: WordPiece (minilm's own), byte-level BPE, Unigram."""
    root = tmp_path_factory.mktemp("tokenizers")
    sentences = bundled_sentences("calibration")
    files = {"wordpiece": root / "wordpiece.json"}
    packed = minilm_package / "assets" / "tokenizer.json.gz"
    files["wordpiece"].write_bytes(gzip.decompress(packed.read_bytes()))
    for name, build in (("bpe", _bpe), ("unigram", _unigram)):
        files[name] = root / f"{name}.json"
        build(sentences).save(str(files[name]))
    return files


def _encoder(path: Path, max_length: int = MAX_LENGTH) -> TextEncoder:
    return TextEncoder(TextPreprocessing(tokenizer=path.name, max_length=max_length), path)


@functools.cache
def _reference(path: Path, max_length: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    return tokenizer


def _whole(path: Path, text: str, max_length: int = MAX_LENGTH) -> list[list[int]]:
    """The reference: the whole, uncut text, tokenized and then truncated by the tokenizer."""
    encoding = _reference(path, max_length).encode(text)
    return [encoding.ids, encoding.attention_mask, encoding.type_ids]


WORDS = [w for s in bundled_sentences("heldout")[:40] for w in s.split()]
pieces = st.one_of(
    st.sampled_from(WORDS),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=12),  # any character but surrogates
    st.sampled_from(["  ", "\t", "\n\n", " ", "'s", "n't", "...", "--", "$3.50", "1,000,000"]),
    st.sampled_from(["北京大学", "naïve", "e\u0301\u0302", "ﷺ", "🙂🙃", "\u200b", "\x00", "\x7f"]),
    st.sampled_from(["[SEP]", "[MASK]", "<s>", "</s>", "<pad>", "[UNK]"]),  # special tokens
    st.integers(90, 130).map(lambda n: "x" * n),  # around WordPiece's 100-character word limit
)
long_texts = st.lists(pieces, min_size=30, max_size=300).map(" ".join)


@pytest.mark.parametrize("family", ["wordpiece", "bpe", "unigram"])
def test_a_cut_text_gives_exactly_the_tokens_of_the_whole_text(tokenizer_files, family):
    path = tokenizer_files[family]
    encoder = _encoder(path)

    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text=long_texts)
    def same_tokens(text: str) -> None:
        feeds = encoder([text])
        got = [feeds[name][0].tolist() for name in ("input_ids", "attention_mask")]
        assert got == _whole(path, text)[:2]

    same_tokens()


@pytest.mark.parametrize("family", ["wordpiece", "bpe", "unigram"])
def test_a_megabyte_of_text_is_cut_to_its_first_probe(tokenizer_files, family):
    path = tokenizer_files[family]
    encoder = _encoder(path, max_length=256)
    text = " ".join(bundled_sentences("heldout")) * 200
    assert len(text) > 1_000_000
    prefix = encoder.prefix_to_tokenize(text)
    assert len(prefix) == 256 * PROBE_CHARS_PER_TOKEN  # all the tokenizer sees of 1 MB
    # (the whole megabyte as reference takes the tokenizer 10 s; 20,000 characters show the same)
    assert encoder([text])["input_ids"][0].tolist() == _whole(path, text[:20_000], 256)[0]


def test_normal_text_is_never_cut(tokenizer_files):
    encoder = _encoder(tokenizer_files["wordpiece"], max_length=256)
    for sentence in bundled_sentences("all"):
        assert encoder.prefix_to_tokenize(sentence) is sentence


def test_a_lone_surrogate_is_an_input_error(tokenizer_files):
    encoder = _encoder(tokenizer_files["wordpiece"])
    with pytest.raises(InputError, match=r"text 1 holds a lone surrogate '\\ud800' at character 2"):
        encoder(["fine", "ab\ud800cd"])


class CountingRuntime:
    """A runtime whose ``run`` calls are counted (rows of each call)."""

    def __init__(self, runtime):  # type: ignore[no-untyped-def]
        self._runtime = runtime
        self.calls: list[int] = []

    def run(self, feeds):  # type: ignore[no-untyped-def]
        self.calls.append(len(next(iter(feeds.values()))))
        return self._runtime.run(feeds)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._runtime, name)


@pytest.fixture(scope="module")
def minilm_runtime(minilm_package):
    return load_package(minilm_package)


def test_chunks_bound_the_tokens_of_each_run():
    lengths = np.array([3, 5, 5, 8, 9, 40, 41, 100])
    rows = np.argsort(lengths)
    parts = chunks(rows, lengths, run_tokens=20)
    assert np.concatenate(parts).tolist() == rows.tolist()
    for part in parts:
        assert len(part) == 1 or len(part) * lengths[part].max() <= 20


def test_chunked_texts_equal_unchunked_and_stop_when_abandoned(minilm_runtime):
    texts = bundled_sentences("heldout")[:24]
    whole = answer_texts(minilm_runtime, texts)["embedding"]
    counting = CountingRuntime(minilm_runtime)
    chunked = answer_texts(counting, texts, run_tokens=64)["embedding"]  # type: ignore[arg-type]
    assert len(counting.calls) > 3
    np.testing.assert_allclose(chunked, whole, atol=1e-5)

    stopping = CountingRuntime(minilm_runtime)
    with pytest.raises(Abandoned):
        answer_texts(
            stopping,  # type: ignore[arg-type]
            texts,
            run_tokens=64,
            abandoned=lambda: len(stopping.calls) >= 2,
        )
    assert len(stopping.calls) == 2
