"""HTTP API over a ``CTRService`` (FastAPI).

    GET  /health               liveness (never needs the token)
    GET  /info                 model, adaptation settings, number of cached users
    POST /predict              {"user": id, "items": [id...], "history": [{"item": id, "label": 0|1}...]}
    POST /adapt                {"user": id, "interactions": [{"item": id, "label": 0|1}...], "history": [...]}
    DELETE /users/{user}       drop a user's adapted parameters

An id is a JSON string or integer; ids never seen in training map to the unknown code and are
scored, not rejected. Anything else (NaN, inf, floats, booleans, null, objects) is a 422 whose body
names the field and never echoes the input. A body over ``Limits.max_body_bytes`` is a 413 before
anything is parsed; with a token, every route but ``/health`` answers 401 without
``Authorization: Bearer <token>``.

Concurrency: the endpoints are ``async`` and call the service on the event loop's thread, which
is thus the one worker that scores, fed by uvicorn's connections in arrival order. Measured on 2
cores (docs/serving.md): a thread pool added GIL contention and thread hops (more CPU per request,
worse tails) and two scoring threads gave less throughput than one. The service is thread-safe on
its own as well (``CTRService``: model replicas, immutable per-user mappings), so this is a choice
of speed, not what keeps users apart.
"""

# no `from __future__ import annotations`: FastAPI must see the request models built in create_app
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictInt, StrictStr, Tag

from metactr.errors import ConfigError, MetactrError
from metactr.serve.service import CTRService, Interaction

MAX_ID_CHARS = 256
_SHOWN_ERRORS = 10  # a 422 lists at most this many problems (and how many there were)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB
    max_items: int = 10_000  # candidates per /predict
    max_interactions: int = 1_000  # labelled interactions per /adapt
    max_history: int = 1_000  # session entries (only the last max_hist_len are used)

    def __post_init__(self) -> None:
        bad = [k for k, v in vars(self).items() if not (isinstance(v, int) and v >= 1)]
        if bad:
            raise ConfigError(f"request limits must be integers >= 1: {', '.join(bad)}")


def _id_kind(value) -> str | None:
    kind = type(value)  # exact types: bool is no id, nor is 1.0 or NaN
    return "string" if kind is str else "integer" if kind is int else None


Id = Annotated[Annotated[StrictStr, Field(max_length=MAX_ID_CHARS), Tag("string")]
               | Annotated[StrictInt, Field(ge=-(2**63), lt=2**63), Tag("integer")],
               Discriminator(_id_kind, custom_error_type="id_type",
                             custom_error_message="an id must be a JSON string or integer")]


def check_token(token: str) -> str:
    """The token, if it can be sent in an HTTP header (visible ASCII, no spaces); else ConfigError."""
    if not token or not all(33 <= ord(c) <= 126 for c in token):
        raise ConfigError("the bearer token must be non-empty visible ASCII without spaces")
    return token


def _models(limits: Limits) -> tuple[type[BaseModel], type[BaseModel]]:
    class _Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class InteractionIn(_Strict):
        item: Id
        label: StrictInt = Field(ge=0, le=1)

    History = Annotated[list[InteractionIn], Field(max_length=limits.max_history)]

    class PredictIn(_Strict):
        user: Id
        items: list[Id] = Field(max_length=limits.max_items)
        history: History = Field(default_factory=list)

    class AdaptIn(_Strict):
        user: Id
        interactions: list[InteractionIn] = Field(min_length=1, max_length=limits.max_interactions)
        history: History = Field(default_factory=list)

    return PredictIn, AdaptIn


def _inter(xs) -> list[Interaction]:
    return [Interaction(x.item, x.label) for x in xs]


class _Guard:
    """ASGI middleware in front of everything: the bearer token, then the body size.

    A declared ``Content-Length`` over the limit is refused before a byte is read; a streamed
    (chunked) body is read up to the limit and refused as soon as it passes it. The body handed on
    is the one read here, so nothing downstream ever sees more than ``max_body_bytes``.
    """

    def __init__(self, app, *, max_body_bytes: int, token: str | None) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.token = None if token is None else token.encode("ascii")

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.token is not None and scope["path"] != "/health" and not self._authorized(scope):
            return await _reply(send, 401, "missing or wrong bearer token", [(b"www-authenticate", b"Bearer")])
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await _reply(send, 413 if declared.isdigit() else 400, self._too_big(declared))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await _reply(send, 413, self._too_big(b""))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    def _too_big(self, declared: bytes) -> str:
        if declared and not declared.isdigit():
            return "bad Content-Length header"
        return f"request body over the limit of {self.max_body_bytes} bytes"


async def _reply(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = JSONResponse({"detail": detail}).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


def _clip(part) -> str | int:
    return part if isinstance(part, int) else str(part)[:64]


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with field paths and messages only: never the input (it can be huge, or NaN that
    JSON cannot even encode)."""
    errors = exc.errors()
    shown = [{"loc": [_clip(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))[:200],
              "type": str(e.get("type", ""))} for e in errors[:_SHOWN_ERRORS]]
    return JSONResponse({"detail": shown, "errors": len(errors)}, status_code=422)


def create_app(service: CTRService, *, limits: Limits | None = None, token: str | None = None) -> FastAPI:
    limits = limits or Limits()
    token = None if token is None else check_token(token)
    PredictIn, AdaptIn = _models(limits)
    app = FastAPI(title="metactr", summary="CTR prediction with per-user fast adaptation")
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_middleware(_Guard, max_body_bytes=limits.max_body_bytes, token=token)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict:
        return service.info()

    @app.post("/predict")
    async def predict(req: PredictIn) -> JSONResponse:
        try:
            probs = service.predict(req.user, req.items, _inter(req.history))
        except MetactrError as e:
            raise HTTPException(422, e.one_line()) from None
        return JSONResponse({"user": str(req.user), "scores": probs})

    @app.post("/adapt")
    async def adapt(req: AdaptIn) -> JSONResponse:
        try:
            return JSONResponse(service.adapt(req.user, _inter(req.interactions), _inter(req.history)))
        except MetactrError as e:
            raise HTTPException(422, e.one_line()) from None

    @app.delete("/users/{user}")
    async def forget(user: Annotated[str, Path(max_length=MAX_ID_CHARS)]) -> dict:
        return {"user": user, "forgotten": service.forget(user)}

    return app
