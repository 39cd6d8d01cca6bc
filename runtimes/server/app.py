"""The HTTP application: Open Inference Protocol routes, errors as ``{"error": ...}``, metrics.

Every request passes the guard first (bearer token, declared body size); inference requests go
through the served model's checks, then the dynamic batcher. Every failure a client can cause is
a 4xx with a JSON message; the server answers 5xx only when it is overloaded or shutting down
(and, for a bug of its own, a JSON 500 naming the exception). Timeouts: the body must arrive
within ``body_timeout_s`` (else 408), the answer within ``request_timeout_s`` of it (else 504);
a request given up (timeout, client gone) leaves the queue at once and its batch stops early.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from edgec.runtimes.server.batching import Abandoned, BatchingConfig, DynamicBatcher, QueueFull
from edgec.runtimes.server.config import ServerConfig
from edgec.runtimes.server.guard import Guard
from edgec.runtimes.server.metrics import ServerMetrics
from edgec.runtimes.server.model import ModelFailure, ServedModel, Work
from edgec.runtimes.server.openapi import INFER_REQUEST_BODY
from edgec.runtimes.server.protocol import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    check_content_encoding,
    check_content_type,
    encode_response,
    parse_request,
)
from edgec.runtimes.server.stages import StageClock
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import edgec
from edgec.errors import DeviceError

# nginx's code for a request whose client closed the connection: counted in the metrics, never
# seen by the client
CLIENT_CLOSED = 499


class ClientGone(Exception):
    """The client closed the connection before its answer."""


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # a message may quote client text: lone surrogates would make the UTF-8 body unencodable
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": safe}, status_code=status, headers=headers)


class InferenceService:
    """Ties the served model, the batcher and the metrics together for the routes."""

    def __init__(self, model: ServedModel, config: ServerConfig, clock: StageClock | None):
        self.model = model
        self.config = config
        self.metrics = ServerMetrics(model.name)
        if clock is not None:
            clock.sink = self.metrics.observe_stage
        self.batcher = DynamicBatcher(
            model.run_batch,
            BatchingConfig(
                max_batch=config.max_batch,
                max_delay_ms=config.max_delay_ms,
                max_queue=config.max_queue,
            ),
            on_batch=self.metrics.observe_batch,
            on_depth=self.metrics.set_queue_depth,
        )
        self.ready = False

    async def infer(self, name: str, request: Request) -> Response:
        started = time.perf_counter()
        response = await self._infer(name, request)
        label = self.model.name if name == self.model.name else "unknown"
        self.metrics.observe_request(response.status_code, time.perf_counter() - started, label)
        return response

    async def _infer(self, name: str, request: Request) -> Response:
        if name != self.model.name:
            return error(404, f"unknown model {name!r}; this server serves {self.model.name!r}")
        if not self.ready:
            return error(503, "the server is not ready (starting or shutting down)")
        try:
            body = await self._read_body(request)
        except ProtocolError as exc:
            # the client may still be sending: close rather than read the rest
            return error(exc.status, str(exc), {"Connection": "close"})
        except ClientGone:
            return error(CLIENT_CLOSED, "the client closed the connection before the whole body")
        deadline = time.perf_counter() + self.config.request_timeout_s
        try:
            # checked once the body is in: refusing earlier closes on a client still sending,
            # whose kernel may then drop the answer (seen in the soak benchmark)
            check_content_type(request.headers.get("content-type"))
            check_content_encoding(request.headers.get("content-encoding"))
            parsed = parse_request(body, request.headers.get(HEADER_LENGTH))
            del body
            work = self.model.check(parsed.inputs)
            self._check_outputs(parsed, work)
        except ProtocolError as exc:
            return error(exc.status, str(exc))
        try:
            outputs = await self._answer(request, work, deadline)
        except QueueFull as exc:
            return error(503, f"overloaded: {exc}; retry later", {"Retry-After": "1"})
        except (asyncio.TimeoutError, Abandoned):
            return error(504, f"the request timed out after {self.config.request_timeout_s} s")
        except ClientGone:
            return error(CLIENT_CLOSED, "the client closed the connection before its answer")
        except ModelFailure as exc:
            return error(422, str(exc))
        except DeviceError as exc:
            return error(503, f"a device is unavailable: {exc}")
        answer, header_length = encode_response(self.model.name, parsed, outputs)
        if header_length is None:
            return Response(answer, media_type="application/json")
        return Response(
            answer,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(header_length)},
        )

    async def _answer(self, request: Request, work: Work, deadline: float) -> Any:
        """The batcher's result for ``work``; gives the work up (out of the queue, its batch
        told to stop) when the deadline passes (``TimeoutError``) or the client leaves
        (``ClientGone``)."""
        submitted = asyncio.ensure_future(
            self.batcher.submit(work, work.key, work.rows, deadline=deadline)
        )
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait(
                (submitted, gone),
                timeout=max(0.0, deadline - time.perf_counter()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if not submitted.done():
                work.cancelled.set()
            for task in (submitted, gone):
                task.cancel()
            await asyncio.gather(submitted, gone, return_exceptions=True)
        if not submitted.cancelled():
            return submitted.result()  # the outputs, or the work's error
        if gone.done() and not gone.cancelled():
            raise ClientGone
        raise asyncio.TimeoutError

    async def _read_body(self, request: Request) -> bytes:
        """The whole body within ``body_timeout_s`` (else 408) and ``max_body_bytes`` (else
        413); ``ClientGone`` when the client leaves before its end."""
        limit, size, chunks = self.config.max_body_bytes, 0, []
        timeout = self.config.body_timeout_s
        deadline = time.perf_counter() + timeout
        while True:
            try:
                message = await asyncio.wait_for(
                    request.receive(), max(0.0, deadline - time.perf_counter())
                )
            except asyncio.TimeoutError:
                raise ProtocolError(
                    f"the request body did not arrive within {timeout} s (body_timeout_s)",
                    status=408,
                ) from None
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"the request body exceeds {limit} bytes", status=413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _check_outputs(self, parsed: InferRequest, work: Any) -> None:
        if parsed.outputs is None:
            return
        known = self.model.output_names(work)
        for output in parsed.outputs:
            if output.name not in known:
                raise ProtocolError(f"unknown output {output.name!r}; this request gives {known}")


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (its body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(
    model: ServedModel, config: ServerConfig, clock: StageClock | None = None
) -> FastAPI:
    """The FastAPI application serving ``model``."""
    service = InferenceService(model, config, clock)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        service.ready = True
        try:
            yield
        finally:  # uvicorn has stopped accepting and waited for in-flight requests
            service.ready = False
            await service.batcher.close()

    app = FastAPI(
        title="edgec serve-on-device",
        version=edgec.__version__,
        description="Open Inference Protocol (KServe v2) over HTTP for one edgec package.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(Guard, token=config.token, max_body_bytes=config.max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(Exception)
    async def server_bug(_: Request, exc: Exception) -> JSONResponse:
        # a bug of ours, never a client's fault: JSON like every answer (uvicorn logs the trace)
        return error(500, f"internal server error ({type(exc).__name__}); see the server log")

    @app.get("/v2", summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {
            "name": "edgec",
            "version": edgec.__version__,
            "extensions": ["binary_tensor_data"],
        }

    @app.get("/v2/health/live", summary="Liveness")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Readiness", response_model=None)
    async def ready() -> Response:
        if service.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False}, status_code=503)

    def known(name: str) -> JSONResponse | None:
        if name == model.name:
            return None
        return error(404, f"unknown model {name!r}; this server serves {model.name!r}")

    @app.get("/v2/models/{name}", summary="Model metadata", response_model=None)
    @app.get("/v2/models/{name}/versions/{version}", include_in_schema=False, response_model=None)
    async def model_metadata(name: str, version: str = "1") -> Response:
        return known(name) or JSONResponse(model.metadata())

    @app.get("/v2/models/{name}/ready", summary="Model readiness", response_model=None)
    @app.get(
        "/v2/models/{name}/versions/{version}/ready", include_in_schema=False, response_model=None
    )
    async def model_ready(name: str, version: str = "1") -> Response:
        missing = known(name)
        if missing is not None:
            return missing
        return JSONResponse({"name": name, "ready": service.ready}, 200 if service.ready else 503)

    infer_doc = {"requestBody": INFER_REQUEST_BODY}

    @app.post(
        "/v2/models/{name}/infer",
        summary="Inference (JSON tensors, or the binary tensor data extension)",
        openapi_extra=infer_doc,
        response_model=None,
    )
    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        include_in_schema=False,
        response_model=None,
    )
    async def infer(name: str, request: Request, version: str = "1") -> Response:
        return await service.infer(name, request)

    @app.get("/metrics", summary="Prometheus metrics", response_model=None)
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    return app
