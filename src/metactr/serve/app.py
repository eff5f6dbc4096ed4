"""HTTP API over a ``CTRService`` (FastAPI).

    GET  /health               liveness
    GET  /info                 model, adaptation settings, cached users
    POST /predict              {"user": id, "items": [id...], "history": [{"item": id, "label": 0|1}...]}
    POST /adapt                {"user": id, "interactions": [{"item": id, "label": 0|1}...], "history": [...]}
    DELETE /users/{user}       drop a user's adapted parameters

Bad input gets a 422 with a one-line message naming the field; ids never seen in training map to
the unknown code and are scored, not rejected.
"""

from __future__ import annotations

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from metactr.errors import MetactrError
from metactr.serve.service import CTRService, Interaction


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InteractionIn(_Strict):
    item: str | int
    label: int = Field(ge=0, le=1)


class PredictIn(_Strict):
    user: str | int
    items: list[str | int] = Field(max_length=10_000)
    history: list[InteractionIn] = Field(default_factory=list, max_length=10_000)


class AdaptIn(_Strict):
    user: str | int
    interactions: list[InteractionIn] = Field(min_length=1, max_length=10_000)
    history: list[InteractionIn] = Field(default_factory=list, max_length=10_000)


def _inter(xs: list[InteractionIn]) -> list[Interaction]:
    return [Interaction(x.item, x.label) for x in xs]


def create_app(service: CTRService) -> FastAPI:
    app = FastAPI(title="metactr", summary="CTR prediction with per-user fast adaptation")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict:
        return service.info()

    @app.post("/predict")
    def predict(req: PredictIn) -> dict:
        try:
            probs = service.predict(req.user, req.items, _inter(req.history))
        except MetactrError as e:
            raise HTTPException(422, e.one_line()) from None
        return {"user": str(req.user), "scores": probs}

    @app.post("/adapt")
    def adapt(req: AdaptIn) -> dict:
        try:
            return service.adapt(req.user, _inter(req.interactions), _inter(req.history))
        except MetactrError as e:
            raise HTTPException(422, e.one_line()) from None

    @app.delete("/users/{user}")
    def forget(user: str) -> dict:
        return {"user": user, "forgotten": service.forget(user)}

    return app
