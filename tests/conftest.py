"""Shared fixtures: small random Hugging Face models on disk, and exported packages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
    """A real uvicorn server on a free loopback port, in a thread of this process."""

    def __init__(self, app, *, tls_cert=None, tls_key=None):  # type: ignore[no-untyped-def]
        import threading

        import uvicorn
        from edgec.runtimes.server import bind

        self.app = app
        self._sock = bind("127.0.0.1", 0)
        port = self._sock.getsockname()[1]
        scheme = "https" if tls_cert else "http"
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.address = f"127.0.0.1:{port}"
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            ssl_certfile=tls_cert,
            ssl_keyfile=tls_key,
            timeout_graceful_shutdown=10,
        )
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
