"""The CLIP prompt classifier shared by training, evaluation, prediction and serving.

An image is scored against each class by the scaled cosine similarity between its CLIP
image embedding and the class's text embedding (the normalised mean over the class's prompt
templates). Softmax over the classes gives probabilities.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

META_FILE = "pneumoclip.json"


class ImageError(ValueError):
    """The bytes or file are not an image this classifier can read."""


class UnsupportedFormat(ImageError):
    """An image, but in a format this classifier does not decode (the service answers 415)."""


# ---------------------------------------------------------------- images

ACCEPTED = "PNG, JPEG or DICOM"
PIL_FORMATS = ("PNG", "JPEG")  # what Pillow may decode (a JPEG may open as MPO: accepted)

# The size rule, checked from the header before any pixel is decoded. The CLIP processor
# scales an image's short side up to its input size keeping the aspect ratio, so a
# 2,000,000 x 2 image (4 million pixels, under any pixel cap) would become gigabytes.
# Chest X-rays are roughly 1:1 to 2:1 (the Kermany originals; the copies in data/ are all
# 224 x 224), so the rule refuses no radiograph.
MIN_SIDE = 32
MAX_ASPECT = 4
SIZE_RULE = (
    f"the short side must be at least {MIN_SIDE} px and the long side at most "
    f"{MAX_ASPECT} times the short side"
)


def check_size(width: int, height: int, max_pixels: int | None = None) -> None:
    """Raise ImageError if `width` x `height` breaks the pixel cap or the size rule."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
            f"image of {width}x{height} pixels is over the limit of {max_pixels:,} pixels"
        )
    short, long = sorted((width, height))
    if short < MIN_SIDE:
        raise ImageError(f"image of {width}x{height} pixels is too small: {SIZE_RULE}")
    if long > MAX_ASPECT * short:
        raise ImageError(
            f"image of {width}x{height} pixels is too elongated ({long / short:.1f}:1): "
            f"{SIZE_RULE}"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, RGB, RGBA, P, I;16, I, F) to 8-bit grayscale replicated to RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    elif image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("L").convert("RGB")


def equalized(image: Image.Image) -> Image.Image:
    """The gray image histogram-equalised, as gray RGB: the same for any monotonic
    increasing intensity curve applied before (up to 8-bit rounding)."""
    return ImageOps.equalize(image.convert("L")).convert("RGB")


def read_image(source: str | Path | bytes, max_pixels: int | None = None) -> Image.Image:
    """Open and fully decode a PNG, JPEG or DICOM image from a path or bytes, as gray RGB.

    Raises UnsupportedFormat for another image format (GIF, BMP, TIFF, WebP, ...) and
    ImageError for anything else unusable: unreadable bytes, over `max_pixels` (width x
    height), or against the size rule (SIZE_RULE), both checked from the header before any
    pixel is decoded. A JPEG's or PNG's EXIF orientation is applied. DICOM: see read_dicom.
    """
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as err:
        raise ImageError(f"cannot read {source}: {err.strerror}") from err
    if not raw:
        raise ImageError("empty image (0 bytes)")
    if is_dicom(raw):
        return read_dicom(raw, max_pixels)
    found = sniff_format(raw)
    if found is None:
        raise ImageError(f"not a readable image: not {ACCEPTED}")
    if found not in PIL_FORMATS:
        raise UnsupportedFormat(f"{found} images are not accepted: send {ACCEPTED}")
    try:
        with Image.open(io.BytesIO(raw), formats=list(PIL_FORMATS)) as image:
            if image.format not in (*PIL_FORMATS, "MPO"):  # what Pillow's JPEG opener gives
                raise UnsupportedFormat(
                    f"{image.format} images are not accepted: send {ACCEPTED}"
                )
            check_size(image.width, image.height, max_pixels)
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"image too large: {err}") from err
    except Image.UnidentifiedImageError as err:
        raise ImageError(f"not a readable image: broken {found} data") from err
    except Exception as err:  # PIL raises many types for broken data
        raise ImageError(f"not a readable image: {err}") from err


def sniff_format(raw: bytes) -> str | None:
    """Pillow's name of the format whose signature `raw` starts with (nothing is parsed)."""
    Image.init()
    prefix = raw[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # noqa: S112 - a plugin's check that fails is no match
            continue
    return None


# ---------------------------------------------------------------- DICOM


def is_dicom(raw: bytes) -> bool:
    """A DICOM file (PS3.10): a 128-byte preamble, then b"DICM", as pydicom reads it."""
    return len(raw) >= 132 and raw[128:132] == b"DICM"


def read_dicom(raw: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode the first frame of a DICOM file as a radiologist's viewer shows it, gray RGB.

    Rows x Columns are checked against `max_pixels` (default: Pillow's decompression-bomb
    limit) and the size rule before decoding. The pixel data are decoded by pydicom (a
    compressed transfer syntax through its installed plugins, else UnsupportedFormat naming
    the syntax); then the modality LUT (rescale slope and intercept), then the VOI LUT or
    window, each as the file states. With a VOI, its output range maps to 0-255; without,
    8-bit data stay as they are and deeper data are stretched from their minimum to their
    maximum (as to_rgb does for 16-bit PNGs). MONOCHROME1 is inverted. Of a multi-frame
    file only the first frame is read.
    """
    from pydicom.pixels import apply_modality_lut, pixel_array

    try:  # pydicom parses elements when they are first read, and raises many types
        ds = dicom_header(raw, max_pixels)
        array = pixel_array(ds, index=0)
        if array.shape[:2] != (ds.Rows, ds.Columns):
            raise ImageError(f"DICOM pixel data of shape {array.shape} are not "
                             f"{ds.Rows}x{ds.Columns}")
        if ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2"):
            gray = dicom_gray(apply_modality_lut(array, ds), ds)
            return to_rgb(Image.fromarray(gray, mode="L"))
        if array.dtype != np.uint8:  # RGB deeper than 8 bits
            array = stretch(array, *minmax(array))
        return to_rgb(Image.fromarray(array, mode="RGB"))
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"not a readable DICOM file: {err}") from err


def dicom_header(raw: bytes, max_pixels: int | None):
    """The parsed dataset, once its pixel data, transfer syntax, photometric interpretation
    and size pass (nothing decoded yet)."""
    import pydicom
    from pydicom.pixels import get_decoder

    ds = pydicom.dcmread(io.BytesIO(raw), force=False)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageError("DICOM has no pixel data")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise ImageError("DICOM has no transfer syntax (0002,0010)")
    try:
        decodable = get_decoder(syntax).is_available
    except NotImplementedError:
        decodable = False
    if not decodable:
        named = syntax if syntax.name == str(syntax) else f"{syntax.name} ({syntax})"
        raise UnsupportedFormat(f"DICOM transfer syntax {named} cannot be decoded here")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422",
                           "YBR_RCT", "YBR_ICT"):  # pydicom gives the YBR ones as RGB
        raise UnsupportedFormat(
            f"DICOM photometric interpretation {photometric or '(none)'} is not supported: "
            "send MONOCHROME1, MONOCHROME2 or RGB"
        )
    ds.PhotometricInterpretation = photometric
    rows, columns = ds.get("Rows"), ds.get("Columns")
    if not isinstance(rows, int) or not isinstance(columns, int) or rows < 1 or columns < 1:
        raise ImageError(f"DICOM has no image size (Rows {rows}, Columns {columns})")
    if max_pixels is None and Image.MAX_IMAGE_PIXELS:
        max_pixels = 2 * Image.MAX_IMAGE_PIXELS  # where Pillow refuses a decompression bomb
    check_size(columns, rows, max_pixels)
    if syntax.is_encapsulated and "PixelData" in ds:
        check_codestream(ds, syntax)
    return ds


def check_codestream(ds, syntax) -> None:
    """A JPEG or JPEG 2000 first frame must declare the Rows x Columns the header does:
    a decoder would allocate what the codestream declares before anyone compared."""
    from pydicom.encaps import get_frame

    frames = int(ds.get("NumberOfFrames") or 1)
    frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
    try:
        with Image.open(io.BytesIO(frame), formats=["JPEG", "JPEG2000"]) as codestream:
            size = codestream.size  # the header only
    except Image.DecompressionBombError:
        raise
    except Exception:  # not a codestream Pillow reads (RLE, JPEG-LS, ...): the decoder checks
        return
    if size != (ds.Columns, ds.Rows):
        raise ImageError(f"DICOM frame of {size[0]}x{size[1]} pixels in a {ds.Columns}x"
                         f"{ds.Rows} image ({syntax.name})")


def dicom_gray(values: np.ndarray, ds) -> np.ndarray:
    """Modality values to 8-bit gray through the dataset's VOI LUT or window, if any."""
    from pydicom.pixels import apply_voi, apply_voi_lut, apply_windowing

    lut = ds.get("VOILUTSequence")
    if lut and "LUTDescriptor" in lut[0] and "LUTData" in lut[0]:  # pydicom prefers it
        entries, first = (lut[0].LUTDescriptor[0] or 2**16), lut[0].LUTDescriptor[1]
        table = apply_voi(np.arange(first, first + entries), ds)
        low, high = float(table.min()), float(table.max())
        values = apply_voi_lut(values, ds)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        low, high = sorted(float(v) for v in apply_windowing(np.array([-np.inf, np.inf]), ds))
        values = apply_voi_lut(values, ds)
    elif values.dtype == np.uint8:
        low, high = 0.0, 255.0
    else:
        low, high = minmax(values)
    gray = stretch(values, low, high)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # 0 is white
        gray = 255 - gray
    return gray


def minmax(values: np.ndarray) -> tuple[float, float]:
    return float(values.min()), float(values.max())


def stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """`values` from [low, high] to uint8 [0, 255] (all 0 when the range is empty)."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) / (high - low) * 255
    return np.clip(scaled.round(), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- embeddings


def tokenize_prompts(tokenizer, prompts: dict[str, list[str]], device=None) -> list[dict]:
    """One batch of token tensors per class (its prompt templates)."""
    batches = [
        tokenizer(t, padding=True, truncation=True, return_tensors="pt") for t in prompts.values()
    ]
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def class_text_embeddings(clip, tokens: list[dict]) -> torch.Tensor:
    """(classes, dim): per class, the normalised mean of its normalised prompt embeddings."""
    rows = []
    for batch in tokens:
        pooled = clip.text_model(**batch).pooler_output
        embeds = F.normalize(clip.text_projection(pooled), dim=-1)
        rows.append(F.normalize(embeds.mean(dim=0), dim=-1))
    return torch.stack(rows)


def image_embeddings(clip, pixel_values: torch.Tensor) -> torch.Tensor:
    pooled = clip.vision_model(pixel_values=pixel_values).pooler_output
    return F.normalize(clip.visual_projection(pooled), dim=-1)


def prompt_logits(clip, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    return clip.logit_scale.exp() * image_embeds @ text_embeds.T


# ---------------------------------------------------------------- the trained classifier


def preprocess(processor, images: list[Image.Image], equalize: bool) -> torch.Tensor:
    """The model's input for gray RGB `images`: equalised first if the model was trained
    so, then its own CLIP processor. Training and every use of a model go through here."""
    if equalize:
        images = [equalized(im) for im in images]
    return processor(images=images, return_tensors="pt")["pixel_values"]


@dataclass
class ClipClassifier:
    """A (LoRA-merged) CLIP, its processor and the class text embeddings, ready to predict."""

    clip: object
    processor: object
    classes: list[str]
    text_embeds: torch.Tensor
    temperature: float = 1.0
    batch_size: int = 64
    # mean calibrated validation posterior, recorded by train_clip; prior adaptation's start
    reference_priors: list[float] | None = None
    equalize: bool = False  # histogram-equalise each image first (as it was trained)

    @classmethod
    def load(cls, model_dir: str | Path, base_dir: str | Path | None = None) -> ClipClassifier:
        """Load `models/clip-lora/VARIANT` (or the same folder inside an MLflow model).

        The base comes from `base_dir`, else from `model_dir/base` when the folder carries a
        copy (tiny bases do), else from the path or hub id recorded at training time.
        """
        from peft import PeftModel
        from transformers import CLIPModel, CLIPProcessor

        model_dir = Path(model_dir)
        meta = json.loads((model_dir / META_FILE).read_text())
        revision = None
        if base_dir is None:
            if (model_dir / "base").is_dir():
                base_dir = model_dir / "base"
            elif Path(meta["base"]).is_dir():
                base_dir = meta["base"]
            elif not meta["base_is_tiny"]:  # a hub base: fetch it by id and revision
                base_dir, revision = meta["base_source"], meta["base_revision"]
            else:
                raise FileNotFoundError(f"the tiny base {meta['base']} of {model_dir} is gone; "
                                        "rebuild it with `dvc repro base_models`")
        clip = CLIPModel.from_pretrained(str(base_dir), revision=revision)
        if (model_dir / "adapter_config.json").is_file():
            clip = PeftModel.from_pretrained(clip, str(model_dir)).merge_and_unload()
        clip.eval()
        processor = CLIPProcessor.from_pretrained(str(model_dir))
        classifier = cls.from_parts(clip, processor, meta["prompts"],
                                    meta.get("temperature", 1.0), meta.get("reference_priors"))
        classifier.equalize = meta.get("equalize", False)
        return classifier

    @classmethod
    def from_parts(cls, clip, processor, prompts: dict[str, list[str]], temperature: float = 1.0,
                   reference_priors: list[float] | None = None):
        with torch.no_grad():
            tokens = tokenize_prompts(processor.tokenizer, prompts, clip.device)
            text_embeds = class_text_embeddings(clip, tokens)
        return cls(clip, processor, list(prompts), text_embeds, temperature,
                   reference_priors=reference_priors)

    def to(self, device, dtype: torch.dtype | None = None) -> ClipClassifier:
        """Move the model and the class text embeddings to `device` (and `dtype`, e.g.
        torch.bfloat16 on a GPU); returns self."""
        self.clip.to(device=device, dtype=dtype)
        self.text_embeds = self.text_embeds.to(device=device, dtype=dtype)
        return self

    def on_device(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels on the model's device, in its dtype."""
        return pixel_values.to(device=self.clip.device, dtype=self.clip.dtype)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return preprocess(self.processor, images, self.equalize)

    @torch.no_grad()
    def logits_from_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled logits, in float32 on the model's device."""
        embeds = image_embeddings(self.clip, self.on_device(pixel_values))
        return (prompt_logits(self.clip, embeds, self.text_embeds) / self.temperature).float()

    def predict_proba(self, images: list[Image.Image]) -> np.ndarray:
        """Class probabilities (n, classes) for RGB/any-mode PIL images."""
        images = [to_rgb(im) for im in images]
        out = [
            torch.softmax(self.logits_from_pixels(self.pixel_values(chunk)), dim=-1)
            for chunk in (
                images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size)
            )
        ]
        return torch.cat(out).cpu().numpy() if out else np.zeros((0, len(self.classes)))

    def adapt_priors(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`probs` of one unlabelled batch from one source, re-estimated under the batch's
        own class shares (EM, pneumoclip.priors): (adapted probabilities, estimated shares).
        Refuses fewer than priors.MIN_BATCH images, and a model without reference priors."""
        from pneumoclip.priors import adapt

        if self.reference_priors is None:
            raise ValueError("this model records no reference_priors (it predates prior "
                             "adaptation): retrain it with `dvc repro` to use adapt_priors")
        return adapt(probs, np.asarray(self.reference_priors))

    def answers(self, probs: np.ndarray) -> list[dict]:
        """One {"label", "probabilities"} per row of `probs`."""
        return [
            {"label": self.classes[int(p.argmax())],
             "probabilities": {c: float(v) for c, v in zip(self.classes, p, strict=True)}}
            for p in probs
        ]

    def predict(self, images: list[Image.Image], adapt_priors: bool = False) -> list[dict]:
        """Label and probabilities per image; with `adapt_priors`, the images are one batch
        from one source and each answer also carries the batch's estimated `priors`."""
        probs = self.predict_proba(images)
        if not adapt_priors:
            return self.answers(probs)
        probs, priors = self.adapt_priors(probs)
        shares = {c: float(p) for c, p in zip(self.classes, priors, strict=True)}
        return [answer | {"priors": shares} for answer in self.answers(probs)]
