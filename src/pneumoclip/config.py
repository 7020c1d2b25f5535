"""Typed settings: each stage loads its own section of params.yaml into a dataclass.

params.yaml is the one source of every value: the dataclasses have no defaults. Unknown
keys, missing keys and values of the wrong type fail with a message that names the key, so
a typo in params.yaml never silently falls back to a default. Fields made with `path()` hold
project-relative paths, which `relocate` moves under a work folder (tests, benchmarks).

Profiles: the top-level `profile` names an entry of `profiles`, whose per-section overrides
are merged over the sections before they are typed (`profile: hub` switches the bases, sizes,
LoRA targets and mixed precision together). Every load then checks the mix for combinations
that cannot work together (`check_consistency`), so a stage fails before doing any work.
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


def path() -> Any:
    """A field that holds a path relative to the project root."""
    return dataclasses.field(metadata={"path": True})


# ---------------------------------------------------------------- stage sections


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinyClip:
    """A seeded random-init CLIP of the real architecture, small enough for a CPU."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_layers: int
    heads: int
    projection_dim: int
    max_text_len: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinySD:
    """A random-init Stable Diffusion (UNet, VAE, text encoder) of the real classes."""

    resolution: int
    unet_channels: list[int]
    vae_channels: list[int]
    latent_channels: int
    text_hidden: int
    text_layers: int
    heads: int
    max_text_len: int
    train_timesteps: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseModelSource:
    """`tiny`: the shipped pretrained tiny base (`tiny_dir`); `tiny-random`: the tiny
    architecture, random-init from the seed (unit tests); a local folder in hub layout; or
    anything else, a Hugging Face repo id."""

    source: str
    revision: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseModelsParams:
    seed: int
    out_dir: str = path()
    tiny_dir: str = path()  # the shipped pretrained tiny bases (`pneumoclip pretrain` output)
    clip: BaseModelSource
    sd: BaseModelSource
    tiny_clip: TinyClip
    tiny_sd: TinySD


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrepareParams:
    data_dir: str = path()
    out_dir: str = path()
    val_fraction: float
    test_fraction: float
    seed: int
    extensions: list[str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraParams:
    r: int
    alpha: int
    dropout: float
    # A regex (peft full-matches it against module names) or a list of name suffixes.
    # A bare `q_proj` would match both towers; name the tower in the pattern.
    target_modules: str
    modules_to_save: list[str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class AugmentParams:
    shift: float  # fraction of the image
    scale: float  # +- relative zoom
    rotate: float  # +- degrees
    brightness: float  # +- in units of the normalised intensity
    contrast: float  # +- relative
    fill: str  # what a zoom-out or shift exposes: edge (repeat the edge pixels) or black


@dataclasses.dataclass(frozen=True, kw_only=True)
class VariantParams:
    balance: bool  # class-balanced sampling (the control)
    # A file (the prepare index) adds nothing to the real training split; a folder (a
    # synthesize output) adds its kept synthetic images. dvc.yaml lists it as a
    # dependency, so only the variants that use synthetic images wait for synthesis.
    train_data: str = path()


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainClipParams:
    base_dir: str = path()
    index: str = path()
    out_dir: str = path()
    checkpoint_dir: str = path()
    seed: int
    epochs: int
    patience: int
    batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    warmup_epochs: int
    mixed_precision: str
    calibrate: bool  # fit a softmax temperature on validation
    # histogram-equalise each image before the processor, in training and in every use of
    # the model (recorded in it): invariant to any monotonic intensity curve
    equalize: bool
    lora: LoraParams
    augment: AugmentParams
    prompts: dict[str, list[str]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SdLoraAdapter:
    r: int
    alpha: int
    dropout: float
    target_modules: list[str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SdLoraParams:
    base_dir: str = path()
    index: str = path()
    out_dir: str = path()
    checkpoint_dir: str = path()
    seed: int
    resolution: int
    batch_size: int
    grad_accum: int
    mixed_precision: str
    lr: float
    # passes over each adapter's images: steps = ceil(epochs x images / global batch), so a
    # small set trains briefly and the full set fully
    epochs: float
    warmup_steps: int
    balance: bool  # class-balanced batches, so minority classes are learnt as well
    per_class: bool  # one adapter per class on its own images; false: one shared
    caption_dropout: float  # empty caption, for classifier-free guidance
    snr_gamma: float  # min-SNR loss weighting; 0 turns it off
    noise_offset: float
    checkpoint_every: int
    sample_every: int
    sample_per_class: int
    sample_steps: int
    sample_guidance: float
    lora: SdLoraAdapter
    captions: dict[str, list[str]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainClip:
    """Contrastive image-caption pretraining of the whole tiny CLIP, from random init."""

    epochs: int
    patience: int  # epochs without a zero-shot val macro-F1 gain
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: int
    augment: AugmentParams
    captions: dict[str, list[str]]  # per class; also the zero-shot prompts that pick the epoch


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainSD:
    """The tiny VAE as an autoencoder, then the whole tiny UNet with class captions."""

    batch_size: int
    vae_steps: int
    vae_lr: float
    vae_kl_weight: float
    unet_steps: int
    unet_lr: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainParams:
    """`pneumoclip pretrain`: the shipped tiny bases (not a stage of dvc.yaml: its output is
    committed, and `base_models` installs it)."""

    out_dir: str = path()
    checkpoint_dir: str = path()
    seed: int
    val_fraction: float  # of the pretraining patients, held out to pick the CLIP epoch
    mixed_precision: str
    clip: PretrainClip
    sd: PretrainSD


@dataclasses.dataclass(frozen=True, kw_only=True)
class SynthesizeParams:
    base_dir: str = path()
    lora_dir: str = path()
    index: str = path()
    classifier_dir: str = path()  # judges class consistency
    out_dir: str = path()
    work_dir: str = path()
    metrics: str = path()
    # "balance": bring every class up to the largest class of the training split;
    # or a mapping of class -> number of images.
    counts: str | dict[str, int]
    seed: int
    steps: int
    guidance: float
    scheduler: str  # dpm, ddim, euler or ddpm
    # class -> a caption to guide away from instead of the empty one (SD's negative prompt),
    # e.g. {VIRUS: a chest x-ray of bacterial pneumonia}; classes not named use ""
    negative_prompts: dict[str, str]
    # class -> {other class: weight}: class-contrast guidance. At every sampling step the
    # noise prediction also moves by weight * (own - other), where `other` is the other
    # class's adapter and caption, so a class's images are steered away from the others.
    contrast: dict[str, dict[str, float]]
    batch_size: int
    # Drop images whose probability of their own class, by the `real` classifier, is lower.
    # 0 keeps everything.
    filter_threshold: float
    two_sample_max: int  # images per side in the real-vs-synthetic test
    # Classes with fewer synthetic images than this get extra ones, judged for class
    # consistency but never added to the set (under "balance" the largest class gets none).
    probe_per_class: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateParams:
    models_dir: str = path()
    base_dir: str = path()
    index: str = path()
    out_dir: str = path()
    bootstrap: int
    ece_bins: int
    seed: int
    # score the test set as one batch from one source: its class shares re-estimated by EM
    # first (pneumoclip.priors); off by default (docs/robustness.md says when)
    adapt_priors: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegisterParams:
    models_dir: str = path()
    metrics_dir: str = path()
    variants: list[str]  # candidates
    model_name: str
    alias: str
    out: str = path()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeParams:
    model_name: str
    alias: str
    max_pixels: int  # decompression-bomb guard per image
    max_bytes: int  # per uploaded file
    max_request_bytes: int  # per request body (413 past it)
    max_batch_images: int  # per /classify_batch request
    max_batch_size: int  # in-process batching: images per forward pass at most
    max_in_flight_bytes: int  # request bodies admitted per worker at once; past it 503
    decode_threads: int  # per worker: images decoded at once (bounds the decoding memory)
    workers: int  # server processes, each with its own model and batcher
    torch_threads: int  # per worker; 0 leaves torch's default (all cores)


SECTIONS: dict[str, Any] = {
    "base_models": BaseModelsParams,
    "prepare": PrepareParams,
    "train_clip": TrainClipParams,
    # one entry per classifier variant: train_clip@, evaluate@ and register follow it
    "variants": dict[str, VariantParams],
    "sd_lora": SdLoraParams,
    "synthesize": SynthesizeParams,
    "evaluate": EvaluateParams,
    "register": RegisterParams,
    "serve": ServeParams,
    "pretrain": PretrainParams,
}


# ---------------------------------------------------------------- loading


def load_section(section: str, path: str | Path = DEFAULT_PARAMS) -> Any:
    """Read one stage's section of params.yaml, with the chosen profile applied, into its
    dataclass.

    A stage's outputs depend only on its own section (and the profile's overrides of it);
    the top-level names are checked too, so a misspelt section name is caught, and so is a
    mix of settings that cannot work together (`check_consistency`), in every stage.
    """
    if section not in SECTIONS:
        raise ParamsError(f"unknown params section {section!r} (known: {', '.join(SECTIONS)})")
    raw = load_params(path)
    return _convert(SECTIONS[section], raw.get(section) or {}, section)


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict:
    """params.yaml as plain data, the profile's overrides merged in and the mix checked."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root or pass --params")
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    unknown = sorted(set(raw) - set(SECTIONS) - set(TOP_LEVEL))
    if unknown:
        raise ParamsError(
            f"{path}: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)}, "
            f"{', '.join(TOP_LEVEL)})"
        )
    merged = apply_profile(raw)
    check_consistency(merged)
    return merged


# ---------------------------------------------------------------- profiles

TOP_LEVEL = ("profile", "profiles")  # the settings of profiles themselves, not a stage's
NOT_IN_PROFILES = {"variants": "dvc.yaml's foreach reads the variants section itself; "
                               "edit it there"}


def apply_profile(raw: dict) -> dict:
    """`raw` with `profiles[profile]`'s per-section overrides deep-merged over the sections.

    Nested settings merge key by key; a value that is itself a mapping (prompts, counts,
    variants) is replaced whole, as in `write_relocated`. A file without `profile` has no
    overrides. An unknown profile, section or key fails naming it.
    """
    if "profile" not in raw:
        if raw.get("profiles"):
            raise ParamsError("missing key profile (params.yaml has profiles: name one)")
        return raw
    name = raw["profile"]
    profiles = raw.get("profiles")
    if not isinstance(profiles, dict):
        raise ParamsError(f"profiles must be a mapping of profile names, got {_show(profiles)}")
    if not isinstance(name, str) or name not in profiles:
        raise ParamsError(
            f"unknown profile {name!r} in key profile (known in profiles: {', '.join(profiles)})"
        )
    for other, overrides in profiles.items():  # a typo in any profile fails, chosen or not
        _check_profile(overrides, f"profiles.{other}")
    merged = dict(raw)
    for section, values in (profiles[name] or {}).items():
        merged[section] = _merge(SECTIONS[section], raw.get(section) or {}, values)
    return merged


def _check_profile(overrides: Any, where: str) -> None:
    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise ParamsError(f"{where} must be a mapping of sections, got {_show(overrides)}")
    for section, values in overrides.items():
        if section not in SECTIONS:
            raise ParamsError(
                f"unknown section {where}.{section} (known: {', '.join(SECTIONS)})")
        if section in NOT_IN_PROFILES:
            raise ParamsError(f"{where}.{section}: {NOT_IN_PROFILES[section]}")
        _check_override(SECTIONS[section], values, f"{where}.{section}")


def _check_override(tp: Any, value: Any, where: str) -> None:
    """Every key of an override names a field, and every whole value has the field's type."""
    if not dataclasses.is_dataclass(tp):
        _convert(tp, value, where)
        return
    if not isinstance(value, dict):
        raise ParamsError(f"{where}: expected a mapping, got {_show(value)}")
    fields = {f.name: f for f in dataclasses.fields(tp)}
    hints = typing.get_type_hints(tp)
    for key, item in value.items():
        if key not in fields:
            raise ParamsError(f"unknown key {where}.{key} (known in {where}: {', '.join(fields)})")
        if fields[key].metadata.get("path"):
            raise ParamsError(f"{where}.{key}: a profile cannot move a path (dvc.yaml's deps "
                              "and outs are written from the section's own value)")
        if dataclasses.is_dataclass(hints[key]) and not isinstance(item, dict):
            raise ParamsError(f"{where}.{key}: expected a mapping, got {_show(item)}")
        _check_override(hints[key], item, f"{where}.{key}")


# ---------------------------------------------------------------- consistency

TINY = "tiny"  # the shipped pretrained tiny bases
TINY_RANDOM = "tiny-random"  # the tiny architecture, random-init (unit tests)
TINY_SOURCES = (TINY, TINY_RANDOM)
MIXED_PRECISION = ("no", "fp16", "bf16")
AUGMENT_FILL = ("edge", "black")
# Only a random-init CLIP needs its stem trained fully; a pretrained tower's stem (the
# shipped tiny one's too) is what LoRA builds on, and a fully trained copy throws that away.
RANDOM_STEM = ("patch_embedding", "position_embedding", "pre_layrnorm")


def check_consistency(raw: dict) -> None:
    """Refuse settings that cannot work together, naming the keys (and the way out).

    Checked on the merged params at every load, so `pneumoclip STAGE` and `dvc repro` stop
    before any work. It reads across sections only to refuse a mix; no stage's output
    depends on another section's values through it.
    """
    problems = []
    profile = f" (profile: {raw['profile']})" if "profile" in raw else ""
    base = raw.get("base_models") or {}
    sd_source = (base.get("sd") or {}).get("source")
    clip_source = (base.get("clip") or {}).get("source")
    sd = raw.get("sd_lora") or {}
    clip = raw.get("train_clip") or {}
    saved = (clip.get("lora") or {}).get("modules_to_save") or []
    stem = [m for m in saved if isinstance(m, str) and m.split(".")[-1] in RANDOM_STEM]
    if stem and clip_source not in (None, TINY_RANDOM):
        problems.append(
            f"train_clip.lora.modules_to_save trains {', '.join(stem)} fully, which only the "
            f"random-init CLIP ({TINY_RANDOM}) needs, but base_models.clip.source is "
            f"{clip_source!r}, a pretrained base: drop them (the default saves "
            "visual_projection only)")
    tiny_res = (base.get("tiny_sd") or {}).get("resolution")
    res = sd.get("resolution")
    if sd_source in TINY_SOURCES and None not in (res, tiny_res) and res != tiny_res:
        problems.append(
            f"sd_lora.resolution is {res} but base_models.tiny_sd.resolution is {tiny_res} "
            f"and base_models.sd.source is {sd_source!r}: the tiny base is built for its own "
            "resolution; make them equal")
    for section in ("train_clip", "sd_lora", "pretrain"):
        mp = (raw.get(section) or {}).get("mixed_precision")
        if mp is not None and mp not in MIXED_PRECISION:
            problems.append(f"{section}.mixed_precision is {mp!r}: one of "
                            f"{', '.join(MIXED_PRECISION)}")
    for section in ("train_clip", "pretrain"):
        fill = ((raw.get(section) or {}).get("augment") or {}).get("fill")
        if fill is not None and fill not in AUGMENT_FILL:
            problems.append(f"{section}.augment.fill is {fill!r}: one of {', '.join(AUGMENT_FILL)}")
    if problems:
        raise ParamsError(f"inconsistent params{profile}: " + "; ".join(problems))


def read_yaml(path: str | Path) -> Any:
    """YAML 1.2, as DVC reads params.yaml: `dvc exp run -S` rewrites the file unquoted, and a
    YAML 1.1 reader (PyYAML) would then take `mixed_precision: no` for the boolean false."""
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(Path(path).read_text())


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
    missing = [key for key in fields if key not in data]
    if missing:
        raise ParamsError(f"missing key {where}.{missing[0]} (params.yaml sets every key)")
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


# ---------------------------------------------------------------- relocation


def relocate(raw: dict, root: str | Path) -> dict:
    """A copy of a params mapping whose relative `path()` values lie under `root`.

    Tests and benchmarks run the stages on their own copy of the project this way; the
    stages themselves only ever see the paths they are given. (Profiles hold no paths.)
    """
    return {name: _relocate(SECTIONS[name], value, Path(root)) if name in SECTIONS else value
            for name, value in raw.items()}


def _relocate(tp: Any, value: Any, root: Path) -> Any:
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        out = dict(value)
        for field in dataclasses.fields(tp):
            if field.name not in out:
                continue
            if field.metadata.get("path") and not Path(out[field.name]).is_absolute():
                out[field.name] = str(root / out[field.name])
            else:
                out[field.name] = _relocate(hints[field.name], out[field.name], root)
        return out
    if typing.get_origin(tp) is dict and isinstance(value, dict):
        item = typing.get_args(tp)[1]
        return {k: _relocate(item, v, root) for k, v in value.items()}
    return value


def write_relocated(root: str | Path, source: str | Path = DEFAULT_PARAMS,
                    **overrides: Any) -> Path:
    """`root/params.yaml`: `source` relocated under `root`, with per-section key overrides
    (`train_clip={"epochs": 2}`). Nested settings sections merge key by key; a value that is
    itself a mapping (prompts, counts, contrast) is replaced whole. `profile="hub"` switches
    the profile; `profiles={"hub": {"sd_lora": {"steps": 2}}}` merges into a profile's
    overrides the same way. Returns its path."""
    raw = relocate(read_yaml(source), root)
    for section, values in overrides.items():
        if section == "profile":
            raw["profile"] = values
        elif section == "profiles":
            profiles = dict(raw.get("profiles") or {})
            for name, sections in values.items():
                merged = dict(profiles.get(name) or {})
                for s, v in sections.items():
                    merged[s] = _merge(SECTIONS[s], merged.get(s) or {}, v)
                profiles[name] = merged
            raw["profiles"] = profiles
        else:
            raw[section] = _merge(SECTIONS[section], raw.get(section) or {}, values)
    out = Path(root) / "params.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def _merge(tp: Any, base: dict, new: dict) -> dict:
    if not dataclasses.is_dataclass(tp):
        return new
    hints = typing.get_type_hints(tp)
    return base | {k: _merge(hints[k], base.get(k) or {}, v)
                   if isinstance(v, dict) and dataclasses.is_dataclass(hints.get(k)) else v
                   for k, v in new.items()}
