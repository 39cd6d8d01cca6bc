"""The server through tritonclient, a real Open Inference Protocol client no one here wrote."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from edgec.models.data import bundled_sentences
from edgec.runtimes import load_package
from edgec.runtimes.server import ServedModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(minilm_server):
    client = triton.InferenceServerClient(minilm_server.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def minilm_runtime(minilm_package):
    return load_package(minilm_package)


def _text_input(texts: list[str], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary)
    return tensor


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("minilm")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata("minilm")
    assert [t["name"] for t in metadata["inputs"]] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    assert metadata["parameters"]["text_input"]["datatype"] == "BYTES"


@pytest.mark.parametrize("binary", [True, False])
def test_text_embeddings_match_the_runtime(client, minilm_runtime, binary):
    texts = bundled_sentences("heldout")[:6]
    output = triton.InferRequestedOutput("embedding", binary_data=binary)
    result = client.infer("minilm", [_text_input(texts, binary)], outputs=[output])
    served = result.as_numpy("embedding")
    expected = minilm_runtime.embed(texts)
    assert served.shape == (6, 384) and served.dtype == np.float32
    assert ((served * expected).sum(axis=1)).min() >= 0.9999


def test_token_tensors_match_the_runtime(client, minilm_runtime):
    feeds = minilm_runtime.encode(bundled_sentences("heldout")[6:9])
    inputs = []
    for name, value in feeds.items():
        tensor = triton.InferInput(name, list(value.shape), "INT64")
        tensor.set_data_from_numpy(value, binary_data=True)
        inputs.append(tensor)
    result = client.infer("minilm", inputs)
    expected = minilm_runtime.run(feeds)["last_hidden_state"]
    np.testing.assert_allclose(result.as_numpy("last_hidden_state"), expected, atol=1e-4)


def test_errors_reach_the_client_as_messages(client):
    tensor = triton.InferInput("input_ids", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 3), np.float32))
    with pytest.raises(triton.InferenceServerException, match="input_ids"):
        client.infer("minilm", [tensor])
    with pytest.raises(triton.InferenceServerException, match="unknown model 'nope'"):
        client.infer("nope", [_text_input(["hi"], True)])


def test_metrics_and_openapi(minilm_server, client):
    client.infer("minilm", [_text_input(["metrics please"], True)])
    text = httpx.get(f"{minilm_server.url}/metrics").text
    assert 'edgec_inference_requests_total{model="minilm",status="200"}' in text
    for name in (
        "inference_request_seconds_bucket",
        "batch_size_rows_bucket",
        "queue_depth",
        "stage_seconds",
    ):
        assert f"edgec_{name}" in text, name
    paths = httpx.get(f"{minilm_server.url}/openapi.json").json()["paths"]
    assert "/v2/models/{name}/infer" in paths and "/v2/health/ready" in paths


def test_batched_results_equal_unbatched(minilm_runtime):
    """Requests of different lengths joined in one batch give what each gives alone."""
    model = ServedModel(minilm_runtime)
    texts = bundled_sentences("heldout")[10:15]
    works = [model.check({"text": np.array([t.encode()], dtype=object)}) for t in texts]
    joined = model.run_batch(works)
    for work, together in zip(works, joined, strict=True):
        (alone,) = model.run_batch([work])
        assert isinstance(together, dict) and isinstance(alone, dict)
        np.testing.assert_allclose(together["embedding"], alone["embedding"], atol=1e-5)

    feeds = minilm_runtime.encode(texts[:2])
    tensor_works = [model.check({n: v[i : i + 1] for n, v in feeds.items()}) for i in range(2)]
    together = model.run_batch(tensor_works)
    for work, joint in zip(tensor_works, together, strict=True):
        (alone,) = model.run_batch([work])
        assert isinstance(joint, dict) and isinstance(alone, dict)
        np.testing.assert_allclose(
            joint["last_hidden_state"], alone["last_hidden_state"], atol=1e-5
        )


def test_a_bad_request_in_a_batch_fails_alone(bert_package):
    """Token ids past this tokenizer-less model's vocabulary pass the checks but fail the model:
    joined with a good request, only the bad one fails."""
    model = ServedModel(load_package(bert_package))

    def work(token: int):  # type: ignore[no-untyped-def]
        ids = np.full((1, 4), token, dtype=np.int64)
        return model.check(
            {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": 0 * ids}
        )

    good, bad = work(1), work(10_000)
    assert good.key == bad.key  # the batcher would join them
    together = model.run_batch([good, bad])
    assert isinstance(together[0], dict) and together[0]["last_hidden_state"].shape == (1, 4, 32)
    assert isinstance(together[1], Exception) and "could not run" in str(together[1])


def test_tiny_vit_digits_through_tritonclient(digits_package):
    """Raw ``pixel_values`` (FP32) in, the logits the runtime gives out, labels that agree."""
    from conftest import RunningServer
    from edgec.models.data import digits
    from edgec.runtimes.server import ServerConfig, load_app

    runtime = load_package(digits_package)
    images, labels = digits("test")
    pixels = runtime.encode(images[:32])[runtime.manifest.inputs[0].name]
    with RunningServer(load_app(digits_package, ServerConfig())) as server:
        client = triton.InferenceServerClient(server.address)
        tensor = triton.InferInput(runtime.manifest.inputs[0].name, list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=True)
        output = runtime.manifest.outputs[0].name
        result = client.infer(runtime.name, [tensor], outputs=[triton.InferRequestedOutput(output)])
        client.close()
    served = result.as_numpy(output)
    expected = runtime.run({runtime.manifest.inputs[0].name: pixels})[output]
    np.testing.assert_allclose(served, expected, atol=1e-4)
    assert float((served.argmax(axis=1) == labels[:32]).mean()) >= 0.9
