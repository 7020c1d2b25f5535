"""Typed settings: each stage loads its own section of params.yaml into a dataclass.

Unknown keys and values of the wrong type fail with a message that names the key, so a typo
in params.yaml never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
DEFAULT_PARAMS = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml does not match the typed settings."""


# ---------------------------------------------------------------- stage sections


@dataclasses.dataclass(frozen=True)
class TinyClip:
    """A random-init CLIP of the real architecture, small enough for a CPU."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 64
    text_layers: int = 2
    heads: int = 2
    projection_dim: int = 64
    max_text_len: int = 32


@dataclasses.dataclass(frozen=True)
class TinySD:
    """A random-init Stable Diffusion (UNet, VAE, text encoder) of the real classes."""

    resolution: int = 64
    unet_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 64])
    vae_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 64])
    latent_channels: int = 4
    text_hidden: int = 32
    text_layers: int = 2
    heads: int = 2
    max_text_len: int = 32
    train_timesteps: int = 1000


@dataclasses.dataclass(frozen=True)
class BaseModelSource:
    """`tiny` builds the built-in architecture; anything else is a Hugging Face repo id."""

    source: str = "tiny"
    revision: str = "main"


@dataclasses.dataclass(frozen=True)
class BaseModelsParams:
    seed: int = 0
    out_dir: str = "models/base"
    clip: BaseModelSource = dataclasses.field(default_factory=BaseModelSource)
    sd: BaseModelSource = dataclasses.field(default_factory=BaseModelSource)
    tiny_clip: TinyClip = dataclasses.field(default_factory=TinyClip)
    tiny_sd: TinySD = dataclasses.field(default_factory=TinySD)


@dataclasses.dataclass(frozen=True)
class PrepareParams:
    data_dir: str = "data"
    out_dir: str = "artifacts/prepared"
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    extensions: list[str] = dataclasses.field(default_factory=lambda: [".jpeg", ".jpg", ".png"])


@dataclasses.dataclass(frozen=True)
class LoraParams:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    # A regex (peft full-matches it against module names) or a list of name suffixes.
    # A bare `q_proj` would match both towers; name the tower in the pattern.
    target_modules: str = r".*vision_model.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"
    modules_to_save: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    shift: float = 0.05  # fraction of the image
    scale: float = 0.1  # +- relative zoom
    rotate: float = 7.0  # +- degrees
    brightness: float = 0.1  # +- in units of the normalised intensity
    contrast: float = 0.1  # +- relative


@dataclasses.dataclass(frozen=True)
class VariantParams:
    balance: bool = False  # class-balanced sampling (the control)
    # A file (the prepare index) adds nothing to the real training split; a folder (a
    # synthesize output) adds its kept synthetic images. dvc.yaml lists it as a
    # dependency, so only the variants that use synthetic images wait for synthesis.
    train_data: str = "artifacts/prepared/index.csv"


@dataclasses.dataclass(frozen=True)
class TrainClipParams:
    base_dir: str = "models/base/clip"
    index: str = "artifacts/prepared/index.csv"
    out_dir: str = "models/clip-lora"
    seed: int = 0
    epochs: int = 120
    patience: int = 24
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 0.001
    weight_decay: float = 0.01
    warmup_epochs: int = 1
    mixed_precision: str = "no"
    calibrate: bool = True  # fit a softmax temperature on validation
    lora: LoraParams = dataclasses.field(default_factory=LoraParams)
    augment: AugmentParams = dataclasses.field(default_factory=AugmentParams)
    prompts: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    variants: dict[str, VariantParams] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SdLoraAdapter:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"]
    )


@dataclasses.dataclass(frozen=True)
class DomainPretrain:
    """Tiny profile only: teach the random-init VAE and UNet what an X-ray looks like first.

    A pretrained hub base already knows images; set `enabled: false` for one.
    """

    enabled: bool = True
    # A random-init text path has no conditioning at all; with class_captions the tiny UNet
    # learns it here from the class captions, else from `caption` alone (no class signal).
    class_captions: bool = True
    caption: str = "a chest x-ray"
    vae_steps: int = 300
    vae_lr: float = 0.002
    vae_kl_weight: float = 1e-6
    unet_steps: int = 800
    unet_lr: float = 0.001


@dataclasses.dataclass(frozen=True)
class SdLoraParams:
    base_dir: str = "models/base/sd"
    index: str = "artifacts/prepared/index.csv"
    out_dir: str = "models/sd-lora"
    checkpoint_dir: str = ".checkpoints/sd_lora"
    seed: int = 0
    resolution: int = 64
    batch_size: int = 64
    grad_accum: int = 1
    mixed_precision: str = "no"
    lr: float = 0.001
    steps: int = 400
    warmup_steps: int = 20
    balance: bool = True  # class-balanced batches, so minority classes are learnt as well
    per_class: bool = True  # one adapter per class on its own images; false: one shared
    caption_dropout: float = 0.1  # empty caption, for classifier-free guidance
    snr_gamma: float = 5.0  # min-SNR loss weighting; 0 turns it off
    noise_offset: float = 0.0
    checkpoint_every: int = 100
    sample_every: int = 200
    sample_per_class: int = 4
    sample_steps: int = 20
    sample_guidance: float = 3.0
    lora: SdLoraAdapter = dataclasses.field(default_factory=SdLoraAdapter)
    domain: DomainPretrain = dataclasses.field(default_factory=DomainPretrain)
    captions: dict[str, list[str]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SynthesizeParams:
    base_dir: str = "models/base/sd"
    lora_dir: str = "models/sd-lora"
    index: str = "artifacts/prepared/index.csv"
    classifier_dir: str = "models/clip-lora/real"  # judges class consistency
    out_dir: str = "artifacts/synthetic"
    work_dir: str = ".checkpoints/synthesize"
    metrics: str = "metrics/synthetic.json"
    # "balance": bring every class up to the largest class of the training split;
    # or a mapping of class -> number of images.
    counts: str | dict[str, int] = "balance"
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    scheduler: str = "dpm"  # dpm, ddim, euler or ddpm
    # class -> a caption to guide away from instead of the empty one (SD's negative prompt),
    # e.g. {VIRUS: a chest x-ray of bacterial pneumonia}; classes not named use ""
    negative_prompts: dict[str, str] = dataclasses.field(default_factory=dict)
    # class -> {other class: weight}: class-contrast guidance. At every sampling step the
    # noise prediction also moves by weight * (own - other), where `other` is the other
    # class's adapter and caption, so a class's images are steered away from the others.
    contrast: dict[str, dict[str, float]] = dataclasses.field(
        default_factory=lambda: {"VIRUS": {"BACTERIA": 4.5, "NORMAL": 1.5}})
    batch_size: int = 64
    # Drop images whose probability of their own class, by the `real` classifier, is lower.
    # 0 keeps everything.
    filter_threshold: float = 0.0
    two_sample_max: int = 1000  # images per side in the real-vs-synthetic test
    # Classes with fewer synthetic images than this get extra ones, judged for class
    # consistency but never added to the set (under "balance" the largest class gets none).
    probe_per_class: int = 64


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    models_dir: str = "models/clip-lora"
    base_dir: str = "models/base/clip"
    index: str = "artifacts/prepared/index.csv"
    out_dir: str = "metrics"
    bootstrap: int = 1000
    ece_bins: int = 15
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class RegisterParams:
    models_dir: str = "models/clip-lora"
    metrics_dir: str = "metrics"
    variants: list[str] = dataclasses.field(default_factory=list)  # candidates
    model_name: str = "pneumoclip-classifier"
    alias: str = "champion"
    out: str = "artifacts/registry.json"


@dataclasses.dataclass(frozen=True)
class ServeParams:
    model_name: str = "pneumoclip-classifier"
    alias: str = "champion"
    bento_name: str = "pneumoclip"
    max_pixels: int = 4_000_000  # decompression-bomb guard per image
    max_bytes: int = 10_000_000  # per uploaded file
    max_request_bytes: int = 50_000_000  # per request body (413 past it)
    max_batch_images: int = 32  # per /classify_batch request
    max_batch_size: int = 32  # in-process batching: images per forward pass at most
    workers: int = 1  # server processes, each with its own model and batcher
    torch_threads: int = 0  # per worker; 0 leaves torch's default (all cores)


SECTIONS: dict[str, type] = {
    "base_models": BaseModelsParams,
    "prepare": PrepareParams,
    "train_clip": TrainClipParams,
    "sd_lora": SdLoraParams,
    "synthesize": SynthesizeParams,
    "evaluate": EvaluateParams,
    "register": RegisterParams,
    "serve": ServeParams,
}


# ---------------------------------------------------------------- loading


def load_section(section: str, path: str | Path = DEFAULT_PARAMS) -> Any:
    """Read one stage's section of params.yaml into its dataclass.

    Only that section is parsed, so a stage never depends on another stage's settings; the
    top-level names are still checked, so a misspelt section name is caught too.
    """
    if section not in SECTIONS:
        raise ParamsError(f"unknown params section {section!r} (known: {', '.join(SECTIONS)})")
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root or pass --params")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ParamsError(
            f"{path}: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})"
        )
    return from_dict(SECTIONS[section], raw.get(section) or {}, section)


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass `cls` from a mapping, checking every key and value type."""
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ParamsError(
                f"unknown key {where}.{key} (known in {where}: {', '.join(fields)})"
            )
    values = {key: _convert(hints[key], value, f"{where}.{key}") for key, value in data.items()}
    return cls(**values)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, where)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where} must be a list, got {_show(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where} must be a mapping, got {_show(value)}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ParamsError(f"{where} must be {tp.__name__}, got {_show(value)}")
        return value
    if tp is Any:
        return value
    raise ParamsError(f"{where}: unsupported settings type {tp!r}")  # a bug in this module


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
