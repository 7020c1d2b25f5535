from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT

from pneumoclip import config
from pneumoclip.cli import main
from pneumoclip.config import (
    SECTIONS,
    ParamsError,
    VariantParams,
    load_section,
    relocate,
    write_relocated,
)

PARAMS = ROOT / "params.yaml"


def write_params(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(PARAMS.read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_shipped_params_load_into_their_types(section):
    params = load_section(section, PARAMS)
    if section == "variants":
        assert params and all(isinstance(v, VariantParams) for v in params.values())
    else:
        assert type(params) is SECTIONS[section]


def test_params_yaml_is_the_only_source_of_values():
    """No dataclass carries a default that could drift from params.yaml."""

    def check(cls):
        for field in dataclasses.fields(cls):
            assert field.default is dataclasses.MISSING, f"{cls.__name__}.{field.name}"
            assert field.default_factory is dataclasses.MISSING, f"{cls.__name__}.{field.name}"

    classes = [c for c in vars(config).values()
               if isinstance(c, type) and dataclasses.is_dataclass(c)]
    assert len(classes) > 10
    for cls in classes:
        check(cls)


def test_relocate_moves_every_path_and_nothing_else(tmp_path):
    raw = yaml.safe_load(PARAMS.read_text())
    moved = relocate(raw, tmp_path)
    assert moved["train_clip"]["index"] == str(tmp_path / raw["train_clip"]["index"])
    assert moved["variants"]["augmented"]["train_data"] == str(tmp_path / "artifacts/synthetic")
    assert moved["sd_lora"]["checkpoint_dir"] == str(tmp_path / ".checkpoints/sd_lora")
    assert moved["train_clip"]["prompts"] == raw["train_clip"]["prompts"]
    assert moved["serve"] == raw["serve"]
    path = write_relocated(tmp_path, PARAMS, pretrain={"sd": {"vae_steps": 3}},
                           synthesize={"contrast": {"NORMAL": {"BACTERIA": 1.0}}})
    assert load_section("pretrain", path).sd.vae_steps == 3
    assert load_section("pretrain", path).sd.unet_steps == raw["pretrain"]["sd"][
        "unet_steps"]  # a nested section merges
    assert load_section("synthesize", path).contrast == {"NORMAL": {"BACTERIA": 1.0}}  # a value


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["prepare"].update(val_fracton=0.2), "unknown key prepare.val_fracton"),
        (lambda r: r["prepare"].update(seed="zero"), "prepare.seed must be int, got str 'zero'"),
        (lambda r: r["prepare"].update(seed=True), "prepare.seed must be int, got bool True"),
        (
            lambda r: r["base_models"]["tiny_clip"].update(heads=2.5),
            "base_models.tiny_clip.heads must be int, got float 2.5",
        ),
        (
            lambda r: r["prepare"].update(extensions=".jpeg"),
            "prepare.extensions must be a list, got str '.jpeg'",
        ),
        (lambda r: r.update(prepar={}), "unknown section 'prepar'"),
        (lambda r: r["prepare"].pop("seed"), "missing key prepare.seed"),
        (lambda r: r["base_models"]["tiny_sd"].pop("heads"),
         "missing key base_models.tiny_sd.heads"),
    ],
)
def test_bad_params_fail_naming_the_key(tmp_path, edit, message):
    path = write_params(tmp_path, edit)
    section = "base_models" if "base_models" in message else "prepare"
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_section(section, path)
    result = CliRunner().invoke(main, [section.replace("_", "-"), "--params", str(path)])
    assert result.exit_code == 1
    assert message in result.output


def test_params_read_as_dvc_writes_them_after_exp_run_set(tmp_path):
    """`dvc exp run -S` dumps YAML 1.2: `no` unquoted is still the string 'no'."""
    text = PARAMS.read_text().replace('mixed_precision: "no"', "mixed_precision: no")
    assert "mixed_precision: no" in text
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert load_section("train_clip", path).mixed_precision == "no"


def test_int_is_accepted_where_a_float_is_expected(tmp_path):
    path = write_params(tmp_path, lambda r: r["prepare"].update(val_fraction=1))
    assert load_section("prepare", path).val_fraction == 1.0


def test_help_lists_the_stages():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in stages:
        assert name.replace("_", "-") in result.output


# ---------------------------------------------------------------- profiles

HUB_ID_SD = "stabilityai/stable-diffusion-2-1-base"


def test_the_hub_profile_switches_base_and_sizes_together(tmp_path):
    """`dvc exp run -S profile=hub` rewrites one line; every section then loads the hub
    settings merged over its own, key by key."""
    text = PARAMS.read_text()
    assert text.count("\nprofile: tiny\n") == 1
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("\nprofile: tiny\n", "\nprofile: hub\n"))
    base = load_section("base_models", path)
    assert (base.clip.source, base.sd.source) == ("openai/clip-vit-base-patch16", HUB_ID_SD)
    sd = load_section("sd_lora", path)
    tiny_sd = load_section("sd_lora", PARAMS)
    assert (sd.resolution, sd.mixed_precision, sd.lr, sd.epochs) == (512, "bf16", 1e-4, 10)
    # the rest of the section is the tiny one's: the same recipe
    assert sd.captions == tiny_sd.captions and sd.lora == tiny_sd.lora
    assert sd.snr_gamma == tiny_sd.snr_gamma and sd.caption_dropout == tiny_sd.caption_dropout
    clip = load_section("train_clip", path)
    assert clip.lora == load_section("train_clip", PARAMS).lora  # LoRA-only in both
    assert clip.lora.modules_to_save == ["visual_projection"]
    assert (clip.mixed_precision, clip.lr) == ("bf16", 1e-4)
    assert clip.prompts == load_section("train_clip", PARAMS).prompts
    assert load_section("synthesize", path).batch_size < load_section(
        "synthesize", PARAMS).batch_size
    # the default stays the tiny one, with no overrides at all
    raw = yaml.safe_load(text)
    assert raw["profile"] == "tiny" and raw["profiles"]["tiny"] == {}
    assert load_section("base_models", PARAMS).sd.source == "tiny"


def leaves(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("clip", "sd"):
            out |= leaves(value, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def test_tiny_and_hub_profiles_differ_only_in_the_base_and_the_sizes():
    """The recipe (prompts, captions, seeds, guidance, LoRA rank, loss weighting) is one; a
    profile picks the base, what a pretrained base needs instead of a random one, and sizes."""
    hub = yaml.safe_load(PARAMS.read_text())["profiles"]["hub"]
    allowed = {
        "base_models.clip", "base_models.sd",
        "train_clip.epochs", "train_clip.patience", "train_clip.batch_size", "train_clip.lr",
        "train_clip.mixed_precision",
        "sd_lora.resolution", "sd_lora.batch_size", "sd_lora.mixed_precision", "sd_lora.lr",
        "sd_lora.epochs", "sd_lora.warmup_steps", "sd_lora.checkpoint_every",
        "sd_lora.sample_every",
        "synthesize.batch_size",
    }
    assert leaves(hub) <= allowed, leaves(hub) - allowed


def write_profile(tmp_path: Path, profile: str, edit=lambda r: None) -> Path:
    def both(raw):
        raw["profile"] = profile
        edit(raw)

    return write_params(tmp_path, both)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(profile="gpu"),
         "unknown profile 'gpu' in key profile (known in profiles: "),
        (lambda r: r["profiles"]["hub"]["sd_lora"].update(stepz=3),
         "unknown key profiles.hub.sd_lora.stepz"),
        (lambda r: r["profiles"]["hub"].update(train_clip={"lora": {"rank": 4}}),
         "unknown key profiles.hub.train_clip.lora.rank"),
        (lambda r: r["profiles"]["hub"].update(sdlora={}), "unknown section profiles.hub.sdlora"),
        (lambda r: r["profiles"]["hub"]["sd_lora"].update(batch_size="many"),
         "profiles.hub.sd_lora.batch_size must be int, got str 'many'"),
        (lambda r: r["profiles"]["hub"]["sd_lora"].update(base_dir="elsewhere"),
         "profiles.hub.sd_lora.base_dir: a profile cannot move a path"),
        (lambda r: r["profiles"]["hub"].update(variants={}), "profiles.hub.variants: dvc.yaml"),
        (lambda r: r.pop("profile"), "missing key profile"),
    ],
)
def test_bad_profiles_fail_naming_the_key(tmp_path, edit, message):
    path = write_profile(tmp_path, "hub", edit)
    with pytest.raises(ParamsError) as err:
        load_section("prepare", path)  # any stage: the switch is read by every one
    assert message in str(err.value)


def test_a_typo_in_the_profile_not_chosen_fails_too(tmp_path):
    path = write_profile(tmp_path, "tiny",
                         lambda r: r["profiles"]["hub"]["train_clip"].update(epoch=3))
    with pytest.raises(ParamsError, match=r"unknown key profiles\.hub\.train_clip\.epoch"):
        load_section("train_clip", path)


RANDOM = ["patch_embedding", "position_embedding", "pre_layrnorm", "visual_projection"]



def hub_clip(r):
    r["base_models"]["clip"]["source"] = "openai/clip-vit-base-patch16"


@pytest.mark.parametrize(
    ("profile", "edit", "keys"),
    [
        # a random-init stem trained fully on a pretrained base: the hub's, a local
        # folder's, or the shipped tiny one's
        ("tiny", lambda r: (hub_clip(r), r["train_clip"]["lora"].update(modules_to_save=RANDOM)),
         ["train_clip.lora.modules_to_save trains patch_embedding, position_embedding, "
          "pre_layrnorm", "base_models.clip.source is 'openai/clip-vit-base-patch16'"]),
        ("tiny", lambda r: r["train_clip"]["lora"].update(modules_to_save=RANDOM),
         ["train_clip.lora.modules_to_save trains patch_embedding", "source is 'tiny'"]),
        ("hub", lambda r: r["profiles"]["hub"].update(train_clip={"lora": {
            "modules_to_save": ["pre_layrnorm", "visual_projection"]}}),
         ["train_clip.lora.modules_to_save trains pre_layrnorm fully"]),
        ("tiny", lambda r: (r["base_models"]["sd"].update(source="tiny-random"),
                            r["sd_lora"].update(resolution=128)),
         ["sd_lora.resolution is 128", "source is 'tiny-random'"]),
        ("tiny", lambda r: r["sd_lora"].update(resolution=512),
         ["sd_lora.resolution is 512 but base_models.tiny_sd.resolution is 64"]),
        ("hub", lambda r: r["profiles"]["hub"]["base_models"]["sd"].update(source="tiny"),
         ["sd_lora.resolution is 512 but base_models.tiny_sd.resolution is 64"]),
        ("hub", lambda r: r["profiles"]["hub"]["sd_lora"].update(mixed_precision="fp8"),
         ["sd_lora.mixed_precision is 'fp8'"]),
        ("tiny", lambda r: r["train_clip"]["augment"].update(fill="zero"),
         ["train_clip.augment.fill is 'zero': one of edge, black"]),
    ],
)
def test_an_inconsistent_mix_fails_at_once_naming_the_keys(tmp_path, profile, edit, keys):
    path = write_profile(tmp_path, profile, edit)
    for section in ("base_models", "prepare", "sd_lora"):  # whichever stage runs first
        with pytest.raises(ParamsError) as err:
            load_section(section, path)
        for key in keys:
            assert key in str(err.value)
    # the stage command stops before any work: nothing is built
    out = tmp_path / "models"
    path.write_text(path.read_text().replace("out_dir: models/base", f"out_dir: {out}"))
    result = CliRunner().invoke(main, ["base-models", "--params", str(path)])
    assert result.exit_code == 1 and keys[0] in result.output
    assert not out.exists()


def test_both_shipped_profiles_are_consistent(tmp_path):
    for profile in ("tiny", "hub"):
        path = write_profile(tmp_path, profile)
        for section in SECTIONS:
            load_section(section, path)


def test_write_relocated_switches_and_merges_profiles(tmp_path):
    path = write_relocated(tmp_path, PARAMS, profile="hub",
                           profiles={"hub": {"sd_lora": {"epochs": 3, "lora": {"r": 2}},
                                             "prepare": {"seed": 5}}},
                           sd_lora={"epochs": 7})
    raw = yaml.safe_load(path.read_text())
    assert raw["profile"] == "hub"
    hub = raw["profiles"]["hub"]
    assert hub["sd_lora"]["resolution"] == 512  # merged into, not replaced
    assert hub["sd_lora"]["lora"] == {"r": 2}
    sd = load_section("sd_lora", path)
    assert sd.epochs == 3  # the profile's value wins over the section's
    assert (sd.lora.r, sd.lora.alpha) == (2, 16)  # a nested override merges
    assert sd.base_dir == str(tmp_path / "models/base/sd")  # relocated
    assert load_section("prepare", path).seed == 5
