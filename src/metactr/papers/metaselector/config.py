"""MetaSelector's experiment config: base models, pre-training, the selector, meta-training."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field as PField
from pydantic import field_validator

from metactr.config import StrictModel
from metactr.data.split import MS_NEWUSER_SPLITS, MS_SPLITS

SUPPORT, QUERY, TEST = MS_SPLITS
NEW_TRAIN, NEW_TEST = MS_NEWUSER_SPLITS


# --------------------------------------------------------------------------- configuration
class BaseModelConfig(StrictModel):
    """One base model: a registered model name, its hyper-parameters and how to pre-train it.

    ``beta``/``l1``/``l2`` are FTRL's (McMahan et al. 2013); ``lr`` is its alpha. Our FTRL steps
    on the *mean* gradient of a mini-batch, so McMahan's beta = 1 on per-sample gradients is
    beta = 1 / batch_size here (w = -z / ((beta + sqrt(n)) / alpha) scales with the gradient
    only while sqrt(n) << beta): with beta = 1 and batches of 1000, rare feature values barely
    move and LR stays near the prior (AUC 0.65 on ML-1M instead of the paper's 0.79).
    ``epochs`` None = ``pretrain.epochs``.
    """

    name: str
    hp: dict[str, Any] = PField(default_factory=dict)
    optimizer: Literal["adam", "ftrl", "adagrad", "sgd"] = "adam"
    lr: float = PField(1e-3, gt=0)
    beta: float = PField(1e-3, ge=0)
    l1: float = PField(0.0, ge=0)
    l2: float = PField(0.0, ge=0)
    epochs: int | None = PField(None, ge=0)


class PretrainConfig(StrictModel):
    """Base-model pre-training (Algorithm 1, line 3).

    ``meta_bases`` picks the rows that pre-train the base models MetaSelector starts from:
    ``train`` (the paper: every user's whole training data, support + query) or ``support``
    (ours: the support parts only, so that the query rows of meta-training are *held out* for
    the base models, as the test rows are at meta-test; see docs/metaselector.md). The single
    model baselines are always pre-trained on ``train``.
    """

    enabled: bool = True
    epochs: int = PField(2, ge=0)
    batch_size: int = PField(1000, ge=1)
    meta_bases: Literal["train", "support"] = "train"


class SelectorNetConfig(StrictModel):
    hidden: list[int] = PField(default_factory=lambda: [200, 200, 200])
    embed_dim: int = PField(10, ge=1)
    use_predictions: bool = True
    use_history: bool = True


class MetaTrainConfig(StrictModel):
    """Algorithm 1 with Meta-SGD. ``outer_lr`` None = inner_lr / 10 (the paper's beta)."""

    episodes: int = PField(300, ge=0)
    users_per_episode: int = PField(10, ge=1)
    max_support: int = PField(64, ge=1)
    max_query: int = PField(32, ge=1)
    inner_lr: float = PField(1e-3, gt=0)
    # ours: initial inner rates per base model name and/or 'selector' (the others start at
    # inner_lr), e.g. to meta-train with the same adaptation as meta-test's test_lr
    inner_lr_by_model: dict[str, float] | None = None
    outer_lr: float | None = PField(None, gt=0)
    learn_inner_lr: bool = True  # Meta-SGD; False = plain MAML with a fixed alpha
    inner_steps: int = PField(1, ge=1)
    first_order: bool = False
    vectorize: bool = True
    test_steps: int = PField(1, ge=0)  # adaptation steps at meta-test
    test_max_support: int = PField(1024, ge=1)  # most recent training rows used to adapt at meta-test
    test_chunk: int = PField(64, ge=1)  # users adapted together at meta-test
    simplified_test_adapt: bool = True  # Simplified: adapt the selector at meta-test
    # Fixed fine-tuning rates at meta-test in place of the learned Meta-SGD rates (sec. 5.3: the
    # selector and base models "are firstly fine-tuned before evaluating"): one rate for every
    # adapted parameter, or one per base model name and/or 'selector' (the others keep theirs).
    test_lr: float | dict[str, float] | None = None

    @field_validator("test_lr", "inner_lr_by_model")
    @classmethod
    def _positive_rates(cls, v):
        values = v.values() if isinstance(v, dict) else [] if v is None else [v]
        if any(not x > 0 for x in values):  # also rejects NaN
            raise ValueError(f"rates must be > 0, got {v!r}")
        return v


class SampleSelectorConfig(StrictModel):
    """The paper's sample-level selector (sec. 5.2): a 400-400-400 MLP classifier."""

    enabled: bool = True
    hidden: list[int] = PField(default_factory=lambda: [400, 400, 400])
    embed_dim: int = PField(10, ge=1)
    epochs: int = PField(3, ge=1)
    batch_size: int = PField(1000, ge=1)
    lr: float = PField(1e-3, gt=0)
    refit_bases: bool = True  # base models re-trained on the 75% support part, as the paper


class SelectorExperiment(StrictModel):
    """The whole ``reproduce metaselector`` experiment."""

    base_models: list[BaseModelConfig] = PField(default_factory=lambda: default_base_models())
    pretrain: PretrainConfig = PField(default_factory=PretrainConfig)
    selector: SelectorNetConfig = PField(default_factory=SelectorNetConfig)
    meta: MetaTrainConfig = PField(default_factory=MetaTrainConfig)
    sample_selector: SampleSelectorConfig = PField(default_factory=SampleSelectorConfig)
    simplified: bool = True
    reference_model: str = "deepfm"  # the single model drawn against MetaSelector in the KDE plot
    eval_batch_size: int = PField(4096, ge=1)
    max_users: int | None = PField(None, ge=2)  # keep only the first N users (quick runs)
    disjoint_test_users: bool | None = None  # None: use ms_newuser_* when the dataset has them
    prepare: dict[str, Any] = PField(default_factory=dict)  # extra PrepareConfig keys for the pipeline
    # where base models and selectors train and adapt (the sample-level selector stays on the CPU)
    device: str = PField("cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$")
    threads: int | None = PField(None, ge=1)  # torch intra-op threads; None = torch's default


def default_base_models() -> list[BaseModelConfig]:
    """LR (FTRL), FM, FFM, DeepFM with latent dimension 10 and a 256-256-256 DeepFM MLP (sec. 5.2).

    The paper's "dropout setting 0.9" is TensorFlow's keep probability, i.e. dropout 0.1.
    """
    return [
        BaseModelConfig(name="lr", optimizer="ftrl", lr=0.1, beta=1e-3),
        BaseModelConfig(name="fm", hp={"embed_dim": 10}),
        BaseModelConfig(name="ffm", hp={"embed_dim": 10}),
        BaseModelConfig(name="deepfm", hp={"embed_dim": 10, "hidden": [256, 256, 256], "dropout": 0.1}),
    ]


