"""Typed run configuration: frozen dataclasses, YAML loading, dotted overrides, validation (generic
tree checking: `config_tree.py`). Every key a user can set lives here, with its default. Unknown keys
and impossible values are rejected with the dotted key named: a typo never falls back to a default.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.config_tree import (  # noqa: F401  (config.X kept for callers)
    ConfigError,
    _build,
    _coerce,
    _plain,
    _set_dotted,
    _unknown_key_message,
    digest,
    flatten,
    parse_override,
)


class UnitError(ConfigError):
    """privacy.unit=subject with a partition that does not keep each person in one shard and one slice."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | digits | mnist | cifar10 | cifar100
    root: Optional[str] = None  # folder with the dataset files; None: $DPSISA_DATA, Debian path, ~/.cache
    public: str = "heldout"  # "heldout" (a part of the training set) or another dataset's name
    public_size: int = 10000  # size of the held-out public part (heldout mode)
    private_limit: Optional[int] = None  # use only the first N private samples (fast tests)
    test_limit: Optional[int] = None  # evaluate on the first N test samples
    download: bool = False  # allow torchvision to download (needs internet)
    canaries: int = 0  # audit canaries: pool of M mislabelled test images, each trained on w.p. ½ (pipeline/data/canaries.py)
    canary_seed: int = 0  # their wrong labels and inclusion coins
    keep_half: Optional[int] = None  # LiRA target: train on the private ids fair coins (seeded by this) keep; the rest: non-members
    subjects: Optional[str] = None  # sample_id → subject_id table (.parquet/.csv); None: synthetic (pipeline/data/subjects.py)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "gn_cnn"  # gn_cnn | resnet18_gn | mlp
    width: int = 32  # base channel count (gn_cnn, resnet18_gn) or hidden size / 4 (mlp)


@dataclass(frozen=True)
class PretrainConfig:
    epochs: int = 30
    lr: float = 0.1
    batch_size: int = 128
    augment: bool = False  # random 2-pixel shifts and horizontal flips (not for digits)
    cache_dir: Optional[str] = None  # None: $DPSISA_CACHE or ~/.cache/dpsisa
    seed: Optional[int] = None  # None: the run's seed; LiRA's reference runs take their target's (one public model)
    # source task: pretrain only on the public samples of these class labels (a head over them, in this order);
    # None: all classes. A subset makes the private data carry classes the public model never saw (docs/transfer.md)
    classes: Optional[tuple[int, ...]] = None


@dataclass(frozen=True)
class ShardsConfig:
    count: int = 5
    slices: int = 4


@dataclass(frozen=True)
class PartitionConfig:
    strategy: str = "uniform"  # uniform | by_subject (keyed hashes) | class_balanced | kmeans (data-dependent: not with DP)
    key: Optional[str] = None  # the partition's hash key (any text); None: derived from `seed` (RUN_DIR/partition.json records it)


@dataclass(frozen=True)
class FinetuneConfig:
    strategy: str = "fc_gn"  # full | fc | fc_gn | fc_gn_conv
    conv_fraction: float = 0.05  # fc_gn_conv: fraction of conv weights (largest |w|) that train
    ema: Optional[float] = None  # decay of an exponential moving average of the trained weights (served); None: off
    augmult: int = 0  # augmentation multiplicity K: K augmented draws per sample, averaged before clipping; 0: off


@dataclass(frozen=True)
class PrivacyConfig:
    epsilon: Optional[float] = 1.0  # None/null: no DP (plain SGD)
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"  # prv | rdp
    # what ε protects: "subject" (a person: DP-SGD samples, clips and accounts per data subject) or
    # "sample"; None: subject when partition.strategy=by_subject, else sample (see privacy_unit)
    unit: Optional[str] = None


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0  # epochs over the cumulative data at each slice stage
    batch_size: int = 256  # expected (Poisson) batch size
    lr: float = 0.05
    momentum: float = 0.9
    threads: int = 1  # torch threads per shard; fixed so results are bitwise reproducible
    device: str = "auto"  # auto | cpu | cuda


@dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = None  # None: $RAY_ADDRESS (auto: the host's running cluster), else a local one of its own
    namespace: str = "dpsisa"
    num_cpus: Optional[int] = None  # local cluster size when one is started
    cpus_per_shard: Optional[float] = None  # None: sized from the cluster
    gpus_per_shard: Optional[float] = None  # None: sized from the cluster (0 without GPUs)
    max_restarts: int = 3  # a crashed shard actor (or its lost node) is restarted this often; its call retried
    lease_wait_s: float = 60.0  # how long a writer waits for another Ray cluster's hold on the run to end
    idle_close_s: float = 30.0  # a run's coordinator (without keep-alive) closes after this long without clients
    wait_timeout_s: float = 900.0  # a waiting `forget` / `request --wait` gives up (exit 4, request kept) after this long
    max_parallel_shards: Optional[int] = None  # shards training/replaying/verifying at once; None: cluster CPUs // train.threads


@dataclass(frozen=True)
class TrackingConfig:
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    experiment: str = "dpsisa"
    enabled: bool = True
    registered_model: Optional[str] = None  # None: one name per run directory (registry.model_name)


@dataclass(frozen=True)
class ForgetConfig:
    demo_count: int = 10  # how many random ids `dpsisa demo` forgets


@dataclass(frozen=True)
class BaselinesConfig:
    """`dpsisa baselines` / `dpsisa unlearnable`: the unlearning methods compared side by side.

    The original model is the public model finetuned `full`, non-DP, as one model (S=1, R=1) with
    `train.*`. Defaults are report 003's (lr 0.001, momentum 0.9, weight decay 5e-4) where they fit
    2 CPUs; epoch counts the reports used but that do not fit here say so and are one override away."""

    lr: float = 0.001  # report 003
    momentum: float = 0.9  # report 003
    weight_decay: float = 5e-4  # report 003
    batch_size: int = 64  # unlearning mini-batches (retain / forget)
    finetune_epochs: int = 5  # finetune, selective_finetune (report 003: 5)
    neggrad_epochs: int = 10  # neggrad: retain epochs then forget ascent (report 003: 10)
    alternating_epochs: int = 10  # alternating (report 003: 10)
    alternating_reverse_scale: float = 0.1  # report 003: -0.1 on the loss
    frequent_epochs: int = 10  # frequent_alternating(_ft); report 003: 50 (shrunk for 2 CPUs)
    frequent_reverse_scale: float = 0.5  # report 003: -0.5
    final_finetune_epochs: int = 5  # frequent_alternating_ft, hybrid (report 003: 5)
    hybrid_epochs: int = 10  # report 003's hybrids: 50 (shrunk for 2 CPUs)
    hybrid_finetune_every: int = 10  # periodic retain finetuning (report 003: every 10 epochs)
    hybrid_unfreeze_at: float = 0.3  # earlier layers unfreeze after this share of the epochs
    neggrad_plus_epochs: int = 5  # Kurmanji et al. 2023 joint descent/ascent
    neggrad_plus_alpha: float = 0.99  # weight of the retain loss (1 - alpha on the forget ascent)
    salun_epochs: int = 5  # Fan et al. 2024
    salun_saliency: float = 0.5  # share of weights (largest forget-loss gradient) that may change
    distill_epochs: int = 10
    distill_lr: float = 0.01  # the student learns from scratch-ish (public model): 10× the edits' lr
    distill_temperature: float = 4.0
    distill_forget_weight: float = 1.0  # weight of the forget-set influence penalty
    distill_width: Optional[int] = None  # student width; None: the teacher's
    amnesiac_finetune_epochs: int = 1  # short retain finetune after undoing (Graves et al.)
    amnesiac_fraction: float = 0.01  # amnesiac_sample: share p of parameters whose per-sample gradients are kept
    deltagrad_l2: float = 0.01  # L2 regularisation of the head's softmax regression (strong convexity)
    deltagrad_iterations: int = 200  # full-batch GD steps of the head
    deltagrad_lr: float = 0.2  # 0.5 left a 33% L2 error (vs the exact head) on Fashion-MNIST features at T0=4, m=2
    deltagrad_period: int = 4  # T0: exact gradient every T0 iterations (5 left a 10% error on digits at m=2)
    deltagrad_burn_in: int = 10  # j0: first iterations computed exactly
    deltagrad_history: int = 2  # m: L-BFGS history size
    sisa_shards: int = 5  # the `sisa` row's ensemble
    sisa_slices: int = 4
    dp_epsilon: float = 1.0  # the `dp_nothing` row's privacy target
    dp_strategy: str = "fc_gn"  # its finetuning strategy (DP `full` is slow on CPU)
    unlearnable_budget: float = 8 / 255  # L∞ budget in pixel space ([0, 1] images)
    unlearnable_steps: int = 10  # PGD steps per noise update
    unlearnable_rounds: int = 10  # alternations of model training and noise minimisation
    unlearnable_epochs: int = 15  # training epochs of the from-scratch models compared


@dataclass(frozen=True)
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    forget: ForgetConfig = field(default_factory=ForgetConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars (tuples become lists: YAML and JSON safe)."""
        return _plain(dataclasses.asdict(self))

    def flat(self) -> dict[str, Any]:
        """Dotted key → value, e.g. {"shards.count": 5}; what MLflow logs as params."""
        return flatten(self.to_dict())

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        merged = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(merged, key, value)
        return from_dict(merged)


FINETUNE_STRATEGIES = ("full", "fc", "fc_gn", "fc_gn_conv")  # core.finetune.STRATEGIES (config stays torch-free)
CHOICES = {
    "data.name": ("fashion_mnist", "digits", "mnist", "cifar10", "cifar100"),
    "model.name": ("gn_cnn", "resnet18_gn", "mlp"),
    "partition.strategy": ("uniform", "class_balanced", "kmeans", "by_subject"),
    "finetune.strategy": FINETUNE_STRATEGIES,
    "privacy.accountant": ("prv", "rdp"),
    "train.device": ("auto", "cpu", "cuda"),
    "baselines.dp_strategy": FINETUNE_STRATEGIES,
}

UNITS = ("sample", "subject")


def privacy_unit(config: Config) -> str:
    """The resolved privacy unit: `privacy.unit`, or by default "subject" when the run partitions
    by subject (a person's samples are in one shard and one slice) and "sample" otherwise."""
    if config.privacy.unit is not None:
        return config.privacy.unit
    return "subject" if config.partition.strategy == "by_subject" else "sample"


def cache_root(config: Config) -> Path:
    """Where runs share what they can recompute (pretrained models, noise calibrations)."""
    return Path(config.pretrain.cache_dir or os.environ.get("DPSISA_CACHE") or Path.home() / ".cache" / "dpsisa")


# read the private labels/features to place samples: refused under DP (keep in step with pipeline/data/partition.py)
DATA_DEPENDENT_PARTITIONS = ("class_balanced", "kmeans")


def from_dict(data: dict[str, Any]) -> Config:
    config = _build(Config, data or {}, "")
    validate(config)
    return config


def _check(condition: bool, key: str, why: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}' {why}")


def validate(config: Config) -> None:
    """Reject impossible values; dataset-size checks happen once the data is loaded."""
    flat = config.flat()
    for key, allowed in CHOICES.items():
        _check(flat[key] in allowed, key, f"must be one of {', '.join(allowed)}; got {flat[key]!r}.")
    _check(config.shards.count >= 1, "shards.count", f"must be ≥ 1; got {config.shards.count}.")
    _check(config.shards.slices >= 1, "shards.slices", f"must be ≥ 1; got {config.shards.slices}.")
    eps = config.privacy.epsilon
    _check(eps is None or eps > 0, "privacy.epsilon", f"must be > 0 (or null for no DP); got {eps}.")
    if eps is not None and config.partition.strategy in DATA_DEPENDENT_PARTITIONS:
        raise ConfigError(
            f"config key 'partition.strategy' is {config.partition.strategy}, which places samples by the private data and so "
            f"breaks the DP guarantee (privacy.epsilon={eps}); use partition.strategy=uniform (or by_subject), "
            "or set privacy.epsilon=null for no DP."
        )
    _check(0 < config.privacy.delta < 1, "privacy.delta", f"must be in (0, 1); got {config.privacy.delta}.")
    _check(config.privacy.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0.")
    _check(config.privacy.unit in (None, *UNITS), "privacy.unit", f"must be one of {', '.join(UNITS)} or null; "
           f"got {config.privacy.unit!r}.")
    if config.privacy.unit == "subject" and config.partition.strategy != "by_subject":
        raise UnitError(f"privacy.unit=subject needs partition.strategy=by_subject (a person's samples in one shard and "
                        f"one slice), got {config.partition.strategy}; set partition.strategy=by_subject or privacy.unit=sample.")
    _check(0 < config.finetune.conv_fraction <= 1, "finetune.conv_fraction", "must be in (0, 1].")
    _validate_levers(config)
    _check(config.train.epochs > 0, "train.epochs", f"must be > 0; got {config.train.epochs}.")
    _check(config.train.batch_size >= 1, "train.batch_size", "must be ≥ 1.")
    _check(config.train.lr > 0, "train.lr", "must be > 0.")
    _check(0 <= config.train.momentum < 1, "train.momentum", "must be in [0, 1).")
    _check(config.train.threads >= 1, "train.threads", "must be ≥ 1.")
    _check(config.ray.max_restarts >= 0, "ray.max_restarts", f"must be ≥ 0; got {config.ray.max_restarts}.")
    _check(config.ray.lease_wait_s >= 0, "ray.lease_wait_s", f"must be ≥ 0; got {config.ray.lease_wait_s}.")
    _check(config.ray.idle_close_s > 0, "ray.idle_close_s", f"must be > 0; got {config.ray.idle_close_s}.")
    _check(config.ray.wait_timeout_s > 0, "ray.wait_timeout_s", f"must be > 0; got {config.ray.wait_timeout_s}.")
    _check(config.pretrain.epochs >= 0, "pretrain.epochs", "must be ≥ 0.")
    _check(config.data.public_size >= 1, "data.public_size", "must be ≥ 1.")
    _check(config.data.canaries >= 0, "data.canaries", f"must be ≥ 0 (0: no canaries); got {config.data.canaries}.")
    for key in ("data.private_limit", "data.test_limit"):
        _check(flat[key] is None or flat[key] >= 1, key, "must be ≥ 1 or null.")
    for key in ("ray.cpus_per_shard", "ray.gpus_per_shard"):
        _check(flat[key] is None or flat[key] >= 0, key, "must be ≥ 0 or null.")
    _validate_baselines(config.baselines)


def _validate_levers(config: Config) -> None:
    """The transfer task's keys: the source classes and the DP recipe levers (docs/transfer.md)."""
    classes = config.pretrain.classes
    if classes is not None:
        _check(len(classes) >= 1 and min(classes) >= 0 and len(set(classes)) == len(classes), "pretrain.classes",
               f"must be a non-empty list of distinct class labels ≥ 0 (or null for all classes); got {list(classes)}.")
    ema = config.finetune.ema
    _check(ema is None or 0 < ema < 1, "finetune.ema", f"must be a decay in (0, 1) (or null: off); got {ema}.")
    k = config.finetune.augmult
    _check(k >= 0, "finetune.augmult", f"must be ≥ 0 (0: off); got {k}.")
    _check(k == 0 or config.finetune.strategy != "fc", "finetune.augmult",
           "needs images at every step, but finetune.strategy=fc trains on cached backbone features; "
           "use fc_gn (or full, fc_gn_conv) or set finetune.augmult=0.")


def _validate_baselines(b: BaselinesConfig) -> None:
    for name in ("lr", "deltagrad_lr", "deltagrad_l2", "dp_epsilon", "unlearnable_budget", "distill_temperature",
                 "distill_lr"):
        _check(getattr(b, name) > 0, f"baselines.{name}", f"must be > 0; got {getattr(b, name)}.")
    for name in ("batch_size", "sisa_shards", "sisa_slices", "deltagrad_iterations", "deltagrad_period",
                 "deltagrad_history", "hybrid_finetune_every"):
        _check(getattr(b, name) >= 1, f"baselines.{name}", f"must be ≥ 1; got {getattr(b, name)}.")
    for name in ("finetune_epochs", "neggrad_epochs", "alternating_epochs", "frequent_epochs", "final_finetune_epochs",
                 "hybrid_epochs", "neggrad_plus_epochs", "salun_epochs", "distill_epochs", "amnesiac_finetune_epochs",
                 "deltagrad_burn_in", "unlearnable_steps", "unlearnable_rounds", "unlearnable_epochs", "distill_forget_weight",
                 "weight_decay", "alternating_reverse_scale", "frequent_reverse_scale"):
        _check(getattr(b, name) >= 0, f"baselines.{name}", f"must be ≥ 0; got {getattr(b, name)}.")
    _check(0 <= b.momentum < 1, "baselines.momentum", "must be in [0, 1).")
    for name in ("amnesiac_fraction", "salun_saliency", "neggrad_plus_alpha"):
        _check(0 < getattr(b, name) <= 1, f"baselines.{name}", f"must be in (0, 1]; got {getattr(b, name)}.")
    _check(0 <= b.hybrid_unfreeze_at <= 1, "baselines.hybrid_unfreeze_at", "must be in [0, 1].")
    _check(b.distill_width is None or b.distill_width >= 1, "baselines.distill_width", "must be ≥ 1 or null.")


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply `key=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' not found; pass a YAML file such as jobs/configs/digits.yaml.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must contain a mapping of keys, got {type(data).__name__}.")
    config = _build(Config, data or {}, "")  # validated once, with the overrides: they may fix each other
    if overrides:
        return config.with_overrides(dict(parse_override(o) for o in overrides))
    validate(config)
    return config
