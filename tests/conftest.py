"""Shared fixtures: small random Hugging Face models on disk, and exported packages."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_edgec(*args: str):  # type: ignore[no-untyped-def]
    """``edgec ARGS`` in this process (click's CliRunner on the group that maps every EdgecError
    to its exit code): ``returncode``, ``stdout`` and ``stderr``, as a subprocess would give."""
    from types import SimpleNamespace

    from click.testing import CliRunner

    from edgec.cli import cli

    result = CliRunner().invoke(cli, list(args), prog_name="edgec")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a bug, not an exit code: show its traceback
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


def _save(model, directory: Path) -> Path:  # type: ignore[no-untyped-def]
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random-initialised small BERT, DistilBERT, RoBERTa and ViT saved as model directories."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-models")
    common = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    }
    models = {
        "bert": tf.BertModel(tf.BertConfig(vocab_size=200, **common)),
        "roberta": tf.RobertaModel(tf.RobertaConfig(vocab_size=200, **common)),
        "distilbert": tf.DistilBertModel(
            tf.DistilBertConfig(vocab_size=200, dim=32, n_layers=2, n_heads=4, hidden_dim=64)
        ),
        "vit": tf.ViTForImageClassification(
            tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, num_labels=3, **common)
        ),
    }
    return {name: _save(model.eval(), root / name) for name, model in models.items()}


@pytest.fixture(scope="session")
def minilm_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgec.exporters import export

    path = tmp_path_factory.mktemp("packages") / "minilm"
    export("minilm", path)
    return path


@pytest.fixture(scope="session")
def digits_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgec.exporters import export

    path = tmp_path_factory.mktemp("packages") / "digits"
    export("tiny-vit-digits", path)
    return path


@pytest.fixture(scope="session")
def bert_package(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> Path:
    from edgec.exporters import export

    path = tmp_path_factory.mktemp("packages") / "bert"
    export(tiny_models["bert"], path)
    return path


# --- serving (issue 5) --------------------------------------------------------------------


class RunningServer:
    """A real uvicorn server on a free loopback port, in a thread of this process, configured
    as ``serve-on-device`` configures it (``edgec.runtimes.server.serve.uvicorn_config``)."""

    def __init__(self, app, *, tls_cert=None, tls_key=None):  # type: ignore[no-untyped-def]
        import threading

        import uvicorn
        from edgec.runtimes.server import bind
        from edgec.runtimes.server.serve import uvicorn_config

        self.app = app
        self._sock = bind("127.0.0.1", 0)
        self.port = self._sock.getsockname()[1]
        scheme = "https" if tls_cert else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        config = uvicorn_config(app, tls_cert=tls_cert, tls_key=tls_key, graceful_timeout_s=10)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def __enter__(self) -> RunningServer:
        import time

        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()


@pytest.fixture(scope="session")
def minilm_server(minilm_package: Path):  # type: ignore[no-untyped-def]
    """minilm served with dynamic batching (max batch 8, 5 ms), shared by the server tests."""
    from edgec.runtimes.server import ServerConfig, load_app

    config = ServerConfig(max_batch=8, max_delay_ms=5, max_body_bytes=1 << 20)
    with RunningServer(load_app(minilm_package, config)) as server:
        yield server


@pytest.fixture(scope="session")
def text_calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random token tensors for the random text models, as an .npz by input name."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 200, size=(40, 16))
    mask = np.ones_like(ids)
    mask[::2, 10:] = 0
    path = tmp_path_factory.mktemp("calibration") / "tokens.npz"
    np.savez(path, input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
    return path


@pytest.fixture(scope="session")
def wide_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random BERT whose Linears are big enough (64x128) for the weight-sharing encoding."""
    import torch
    import transformers as tf

    torch.manual_seed(1)
    config = tf.BertConfig(
        vocab_size=200,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    return _save(tf.BertModel(config).eval(), tmp_path_factory.mktemp("wide") / "bert")


@pytest.fixture(scope="session")
def compressed_bert(
    tmp_path_factory: pytest.TempPathFactory, wide_bert: Path, text_calibration: Path
) -> tuple[Path, Path]:
    """(checkpoint, package) of ``wide_bert`` pruned to 2 and 4 heads, smoothed, 4-bit shared,
    int8."""
    from edgec.compressor import PruneStep, QuantizeStep, Recipe, ShareStep, SmoothStep, compress
    from edgec.exporters import export

    root = tmp_path_factory.mktemp("compressed")
    recipe = Recipe(
        name="test",
        steps=(
            PruneStep(heads=(2, 4), ffn=0.25, importance="magnitude"),
            SmoothStep(alpha=0.5),
            ShareStep(bits=4),
            QuantizeStep(),
        ),
    )
    compress(wide_bert, recipe, root / "ckpt", calib=text_calibration)
    export(root / "ckpt", root / "pkg")
    return root / "ckpt", root / "pkg"


# --- memory on the device (issue 11) ------------------------------------------------------


@pytest.fixture(scope="session")
def minilm_lowbit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, package) of minilm with 4-bit shared Linears on the int8 grid and 3-bit
    embeddings: the encodings ``balanced`` uses, without its slow search and distillation. The
    one compression of minilm in a test run."""
    from edgec.compressor import QuantizeStep, Recipe, ShareStep, compress
    from edgec.exporters import export

    root = tmp_path_factory.mktemp("minilm-lowbit")
    recipe = Recipe(
        name="lowbit",
        steps=(
            ShareStep(bits=4, embedding_bits=3, gptq=False, iterations=4),
            QuantizeStep(mode="dynamic"),
        ),
    )
    compress("minilm", recipe, root / "ckpt")
    export(root / "ckpt", root / "pkg")
    return root / "ckpt", root / "pkg"


# --- every architecture through every recipe (issue 12) -----------------------------------

MATRIX_ARCHS = ("minilm", "roberta", "distilbert", "vit")
RANDOM_ARCHS = ("roberta", "distilbert", "vit")  # random-initialised, built by the fixture
MATRIX_RECIPES = ("fp32", "int8", "balanced", "smallest")
MATRIX_EXAMPLES = 160  # calibration examples per random model (128 calibrate, 32 held out)
MATRIX_VOCAB = 200
MATRIX_IMAGE = (3, 32, 32)  # ViT input: 32 x 32 RGB in 8 x 8 patches, 16 tokens + [CLS]


def _matrix_model(arch: str):  # type: ignore[no-untyped-def]
    """A random model for the matrix: hidden 128, 4 heads, FFN 256, 2 layers.

    Wide enough that every Linear keeps >= 4096 elements (weight_sharing.MIN_ELEMENTS) after
    ``smallest`` prunes half the heads and 3/4 of the FFN (64 x 128 at the narrowest), so the
    coded-weight encoding applies in every compressed cell; hidden 64 left ``smallest`` with no
    coded Linear. DistilBERT is a sequence classifier and ViT an image classifier (10 labels),
    so both task heads go through every recipe; RoBERTa is a plain encoder.
    """
    import transformers as tf

    size = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    if arch == "roberta":
        return tf.RobertaModel(
            tf.RobertaConfig(vocab_size=MATRIX_VOCAB, intermediate_size=256, **size)
        )
    if arch == "distilbert":
        config = tf.DistilBertConfig(
            vocab_size=MATRIX_VOCAB, dim=128, n_layers=2, n_heads=4, hidden_dim=256, num_labels=10
        )
        return tf.DistilBertForSequenceClassification(config)
    channels, height, _ = MATRIX_IMAGE
    config = tf.ViTConfig(
        image_size=height,
        patch_size=8,
        num_channels=channels,
        num_labels=10,
        intermediate_size=256,
        **size,
    )
    return tf.ViTForImageClassification(config)


class PackageMatrix:
    """Packages of every (arch, recipe) cell, each built on first request and kept for the session.

    ``get(arch, recipe)`` -> the unsplit package directory. Random models (``roberta``,
    ``distilbert``, ``vit``: see ``_matrix_model``) are compressed with the built-in recipes
    unchanged (``BUILTIN_RECIPES``: distillation steps included), calibrated on
    ``MATRIX_EXAMPLES`` random token sequences (ids 3..199: no special tokens) or random images.
    40 examples were too few: 400 distillation steps on 32 of them overfit, and held-out
    fidelity fell during the distillation. Built on one torch thread (``_torch_threads``), a
    cell took 3 to 15 s and the 12 random cells 111 s together, on 2 cores shared with other
    work (load 2.8); on two threads, 407 s.

    ``minilm`` is the real model, compressed at most once per run: ``fp32`` is
    ``minilm_package``, ``balanced`` is ``minilm_lowbit``'s package (balanced's encodings, without
    its search and distillation); ``int8`` and ``smallest`` skip the test that asks for them.

    ``feeds(arch, batch, seed)``: inputs for the arch's packages, from the calibration
    distribution but not the calibration sample. ``seconds[(arch, recipe)]``: what each cell
    took to compress and export.
    """

    archs = MATRIX_ARCHS
    recipes = MATRIX_RECIPES

    def __init__(self, root: Path, request: pytest.FixtureRequest):
        self.root = root
        self._request = request
        self._models: dict[str, Path] = {}
        self._packages: dict[tuple[str, str], Path] = {}
        self.seconds: dict[tuple[str, str], float] = {}

    def get(self, arch: str, recipe: str) -> Path:
        if arch not in self.archs or recipe not in self.recipes:
            raise ValueError(
                f"no matrix cell ({arch!r}, {recipe!r}): archs {self.archs}, recipes {self.recipes}"
            )
        if (arch, recipe) not in self._packages:
            started = time.perf_counter()
            with _torch_threads(1 if arch in RANDOM_ARCHS else None):
                self._packages[arch, recipe] = self._build(arch, recipe)
            self.seconds[arch, recipe] = time.perf_counter() - started
        return self._packages[arch, recipe]

    def feeds(self, arch: str, batch: int = 8, seed: int = 1000) -> dict[str, np.ndarray]:
        """Inputs by name for ``arch``'s packages: held-out sentences (minilm), random tokens
        with every other row padded, or normalized random images; not the calibration sample."""
        from edgec.runtimes import read_package
        from edgec.runtimes.processing import TextEncoder, encode_images

        if arch == "minilm":
            from edgec.models.data import bundled_sentences

            package = self.get("minilm", "fp32")
            manifest = read_package(package).manifest
            sentences = bundled_sentences("heldout")
            start = seed % (len(sentences) - batch)
            pre = manifest.preprocessing
            encoded = TextEncoder(pre, package / pre.tokenizer)(sentences[start : start + batch])
            return {i.name: encoded[i.name] for i in manifest.inputs}
        arrays = _matrix_arrays(arch, batch, seed)
        manifest = read_package(self.get(arch, "fp32")).manifest
        if arch == "vit":
            return encode_images(manifest.preprocessing, arrays["images"])
        return {i.name: arrays[i.name] for i in manifest.inputs}

    def _model(self, arch: str) -> Path:
        """The arch's random model directory and its calibration .npz, made once."""
        if arch not in self._models:
            import torch

            torch.manual_seed(12)
            self._models[arch] = _save(_matrix_model(arch).eval(), self.root / "models" / arch)
            calibration = self._calibration(arch)
            calibration.parent.mkdir(parents=True, exist_ok=True)
            np.savez(calibration, **_matrix_arrays(arch, MATRIX_EXAMPLES, seed=0))
        return self._models[arch]

    def _calibration(self, arch: str) -> Path:
        return self.root / "calibration" / f"{arch}.npz"

    def _build(self, arch: str, recipe: str) -> Path:
        from edgec.exporters import export

        if arch == "minilm":
            if recipe == "fp32":
                return self._request.getfixturevalue("minilm_package")  # type: ignore[no-any-return]
            if recipe == "balanced":
                return self._request.getfixturevalue("minilm_lowbit")[1]  # type: ignore[no-any-return]
            pytest.skip(
                f"minilm x {recipe}: minilm is compressed at most once per test run, and that "
                "one compression (minilm_lowbit) stands for 'balanced'"
            )
        model = self._model(arch)
        package = self.root / "packages" / f"{arch}-{recipe}"
        if recipe == "fp32":
            export(model, package)
            return package
        from edgec.compressor import compress

        checkpoint = self.root / "checkpoints" / f"{arch}-{recipe}"
        compress(model, recipe, checkpoint, calib=self._calibration(arch), predict_memory=False)
        export(checkpoint, package)
        return package


@contextlib.contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for the block (None: left as they are).

    The random models' matrices are too small for two threads to pay, and while the CPU is
    shared two threads wait on each other at every op: 100 distillation steps of the matrix's
    RoBERTa took 2.5 s on one thread and 14 to 66 s on two, here at a load of 3.3 on 2 cores.
    """
    import torch

    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch intra-op thread for the test, as ``package_matrix`` builds its random cells."""
    with _torch_threads(1):
        yield


def _matrix_arrays(arch: str, count: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` random examples: token ids 3..199 (RoBERTa's 0..2 are special) with every
    other row padded after 10 tokens, or raw uint8 images (N, 3, 32, 32)."""
    rng = np.random.default_rng(seed)
    if arch == "vit":
        return {"images": rng.integers(0, 256, size=(count, *MATRIX_IMAGE)).astype(np.uint8)}
    ids = rng.integers(3, MATRIX_VOCAB, size=(count, 16))
    mask = np.ones_like(ids)
    mask[::2, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@pytest.fixture(scope="session")
def package_matrix(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> PackageMatrix:
    """Every (arch, recipe) package, built on first request: see ``PackageMatrix``."""
    return PackageMatrix(tmp_path_factory.mktemp("matrix"), request)
