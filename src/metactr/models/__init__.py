"""CTR models on the shared batch format. ``build_model(name, spec, **hp)`` builds one by name;
``registry()`` lists them (each module under this package registers its own)."""

from metactr.models.base import CTRModel, ModelOutput, build_model, objective, register, registry

__all__ = ["CTRModel", "ModelOutput", "build_model", "objective", "register", "registry"]
