"""Training of the two-headed lesion classifier (melanoma logit + 9-class diagnosis).

Data (``data_dirs`` may name the shared data root or the dataset folders themselves):

* ``isic2017`` — official train split for training, official val split (150 images, 30 melanomas) for model
  selection (melanoma AUC) and the melanoma temperature. Images were stretched to 256x256 upstream; they are
  resized back to their original aspect ratio (``orig_width``/``orig_height``) before anything else, so the
  network never sees stretched lesions. Melanoma label = ``melanoma_isic2017``; diagnosis = ``MEL`` for
  melanomas, ``diagnosis_isic2019`` where present, else unknown (masked). Input crop = ground-truth mask
  bounding box + 20% margin, squared (:func:`~dermnode.inference.classifier_models.lesion_crop_box`).
* ``isic-9class`` — label cleaning: a row flagged ``duplicate_id_in_other_folder`` or ``conflicts_isic2019`` keeps
  its ``diagnosis_isic2019`` label when ISIC 2019 has one and is dropped otherwise; rows are deduplicated by
  ISIC id; ids that are also in ``isic2017`` are dropped here (their clean diagnosis is copied to the isic2017
  row when that row has none). The ``train`` rows are split (seeded, stratified by class) into 85% training and
  15% ``val`` (diagnosis temperature, 9-class validation); ``test`` rows are kept for evaluation only.
  Melanoma label = (diagnosis == MEL). The whole (lesion-centred) image is the input crop.

Recipe: AdamW, cosine learning rate with warm-up, EMA of the weights (evaluated and exported), masked losses
(binary cross-entropy on the melanoma logit with ``pos_weight = sqrt(n_neg / n_pos)``; cross-entropy with
label smoothing 0.05 and class weights ``~ 1 / sqrt(frequency)`` on the diagnosis logits, weight 0.5),
augmentations (crop-box scale/shift jitter, rotation, aspect jitter, flips, brightness/contrast/saturation/
gamma/channel-gain jitter, blur/sharpen, down-up sampling; optionally a simulated round dermoscope field on the
whole image, detected and filled as at run time, :func:`round_field`). Temperature scaling of both heads on the
validation logits (with the same flip test-time augmentation as inference); ECE (10 bins) before/after is
stored in ``history.json`` and the manifest.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from dermnode.errors import PipelineError
from dermnode.evaluation.classification_metrics import (
    balanced_accuracy,
    expected_calibration_error,
    fit_temperature,
    roc_auc,
)
from dermnode.inference.artefacts import detect_frame, fill_frame
from dermnode.inference.classifier_models import (
    DEFAULT_MARGIN,
    DIAGNOSIS_CLASSES,
    MEAN,
    STD,
    TIMM_BACKBONES,
    ClassifierNet,
    DermNetEnsemble,
    build_classifier,
    classifier_normalisation,
    lesion_crop_box,
    predict_logits,
    preprocess_crop,
    save_classifier,
    warp_crop,
)
from dermnode.inference.imaging import sigmoid, softmax
from dermnode.training.loop import FitConfig, fit

logger = logging.getLogger(__name__)

CLASS_INDEX = {c: i for i, c in enumerate(DIAGNOSIS_CLASSES)}
NINE_CLASS_VAL_FRACTION = 0.15
ROUND_FIELD_P = 0.4
"""Probability of the simulated round dermoscope field (:func:`round_field`) per training image of the 2.1.0
experiment (issue 11; not shipped, see models/classifier.md); :func:`train_classification` applies it only when
asked (``round_field_p``)."""


@dataclass
class Sample:
    """One training/evaluation image held in memory."""

    image_id: str
    source: str  # "isic2017" | "isic-9class"
    split: str  # "train" | "val" | "test"
    rgb: npt.NDArray[np.uint8]
    box: tuple[float, float, float]
    melanoma: int  # 1, 0 or -1 (unknown)
    diagnosis: int  # class index or -1 (unknown)
    whole_image: bool
    mask: npt.NDArray[np.bool_] | None = None  # ground-truth lesion mask (isic2017), same size as ``rgb``


def _find_dataset(data_dirs: list[Path], name: str) -> Path | None:
    for d in data_dirs:
        d = Path(d)
        if d.name == name and (d / "labels.csv").is_file():
            return d
        if (d / name / "labels.csv").is_file():
            return d / name
    return None


def is_training_dataset(data_dir: Path) -> bool:
    """Whether ``data_dir`` is (or holds) one of the training sets this module knows (``isic2017``,
    ``isic-9class``), i.e. whether their labels, splits and cleaning rules apply."""
    return any(_find_dataset([Path(data_dir)], name) is not None for name in ("isic2017", "isic-9class"))


def _read_rgb(path: Path) -> npt.NDArray[np.uint8]:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise PipelineError(f"cannot read image {path}")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def unstretch(
    rgb: npt.NDArray[np.uint8], mask: npt.NDArray[np.bool_] | None, orig_w: int, orig_h: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_] | None]:
    """Resize an aspect-stretched image (and mask) back to the original aspect ratio (enlarging one side).

    Parameters
    ----------
    rgb : ndarray
        uint8 (H, W, 3) stretched image.
    mask : ndarray or None
        Boolean mask of the same size.
    orig_w, orig_h : int
        Original image size.

    Returns
    -------
    tuple
        ``(rgb, mask)`` with ``W / H == orig_w / orig_h`` (to the pixel).
    """
    h, w = rgb.shape[:2]
    if orig_w <= 0 or orig_h <= 0:
        return rgb, mask
    ratio = orig_w / orig_h
    if abs(ratio - w / h) < 0.02:
        return rgb, mask
    if ratio > w / h:
        nw, nh = round(h * ratio), h
    else:
        nw, nh = w, round(w / ratio)
    out = np.asarray(cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
    m = None
    if mask is not None:
        m = cv2.resize(mask.astype(np.uint8) * 255, (nw, nh), interpolation=cv2.INTER_LINEAR) >= 128
    return out, m


def _clean_nine_class(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """ISIC id -> row with a clean ``label`` key (see module docstring)."""
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        noisy = r.get("duplicate_id_in_other_folder") == "1" or r.get("conflicts_isic2019") == "1"
        label = r["diagnosis"]
        if noisy:
            label = r.get("diagnosis_isic2019", "")
        if label not in CLASS_INDEX:
            continue
        iid = r.get("isic_id") or r["image_id"].split("__")[0]
        if iid in out:
            if out[iid]["label"] != label:
                # two different clean labels for one id: unreliable, drop both
                out[iid]["label"] = "?"
            continue
        out[iid] = {**r, "label": label}
    return {k: v for k, v in out.items() if v["label"] in CLASS_INDEX}


def load_samples(data_dirs: list[Path], *, seed: int = 0, splits: tuple[str, ...] | None = None) -> list[Sample]:
    """Load, clean and split the classification data (see the module docstring).

    Parameters
    ----------
    data_dirs : list of Path
        Data root(s) or dataset folders.
    seed : int
        Seed of the isic-9class train/val split.
    splits : tuple of str, optional
        Keep only these splits (``train``, ``val``, ``test``).

    Returns
    -------
    list of Sample
        Samples with their crop boxes.

    Raises
    ------
    PipelineError
        When no dataset is found or an image cannot be read.
    """
    d17 = _find_dataset(data_dirs, "isic2017")
    d9 = _find_dataset(data_dirs, "isic-9class")
    if d17 is None and d9 is None:
        raise PipelineError(f"no isic2017 or isic-9class dataset under {', '.join(map(str, data_dirs))}")
    samples: list[Sample] = []
    rows17: list[dict[str, str]] = []
    if d17 is not None:
        with open(d17 / "labels.csv", newline="") as fh:
            rows17 = list(csv.DictReader(fh))
    ids17 = {r["image_id"] for r in rows17}
    clean9: dict[str, dict[str, str]] = {}
    if d9 is not None:
        with open(d9 / "labels.csv", newline="") as fh:
            clean9 = _clean_nine_class(list(csv.DictReader(fh)))
    for r in rows17:
        assert d17 is not None
        split = r["split"]
        if splits is not None and split not in splits:
            continue
        mel = int(r["melanoma_isic2017"])
        diag_code = "MEL" if mel == 1 else r.get("diagnosis_isic2019", "")
        if not diag_code and r["image_id"] in clean9:
            diag_code = clean9[r["image_id"]]["label"]
        if mel == 0 and diag_code == "MEL":
            diag_code = ""  # contradictory labels: keep the melanoma label only
        diag = CLASS_INDEX.get(diag_code, -1)
        rgb = _read_rgb(d17 / "images" / f"{r['image_id']}.jpg")
        mpath = d17 / "masks" / f"{r['image_id']}.png"
        mask = cv2.imread(str(mpath), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise PipelineError(f"cannot read mask {mpath}")
        rgb, m = unstretch(rgb, mask >= 128, int(r["orig_width"] or 0), int(r["orig_height"] or 0))
        box = lesion_crop_box(m, rgb.shape[:2])
        samples.append(Sample(r["image_id"], "isic2017", split, rgb, box, mel, diag, False, m))
    if d9 is not None:
        rng = random.Random(seed)
        by_class: dict[str, list[str]] = {}
        for iid, r in sorted(clean9.items()):
            if r["split"] == "train" and iid not in ids17:
                by_class.setdefault(r["label"], []).append(iid)
        val_ids: set[str] = set()
        for ids in by_class.values():
            rng.shuffle(ids)
            val_ids.update(ids[: max(1, round(len(ids) * NINE_CLASS_VAL_FRACTION))])
        for iid, r in sorted(clean9.items()):
            if iid in ids17:
                continue  # same image as an isic2017 row (train): avoid duplicates and leakage
            split = "test" if r["split"] == "test" else ("val" if iid in val_ids else "train")
            if splits is not None and split not in splits:
                continue
            assert d9 is not None
            rgb = _read_rgb(d9 / "images" / f"{r['image_id']}.jpg")
            diag = CLASS_INDEX[r["label"]]
            box = lesion_crop_box(None, rgb.shape[:2])
            samples.append(Sample(iid, "isic-9class", split, rgb, box, int(r["label"] == "MEL"), diag, True))
    logger.info("loaded %d classification samples", len(samples))
    return samples


def frame_filled(sample: Sample) -> Sample:
    """The sample with its image as the analyser gives it to the networks: the dermoscope frame filled.

    Parameters
    ----------
    sample : Sample
        A loaded sample.

    Returns
    -------
    Sample
        The same sample (labels, box, mask) with the frame of its image filled; the sample itself when the image
        has no frame.
    """
    frame = detect_frame(sample.rgb)
    if not frame.frame_mask.any():
        return sample
    return dataclasses.replace(sample, rgb=fill_frame(sample.rgb, frame.frame_mask))


# ---------------------------------------------------------------------------------------------------------
# augmentation


def round_field(
    rgb: npt.NDArray[np.uint8],
    rng: np.random.Generator,
    *,
    p: float = ROUND_FIELD_P,
    centre: tuple[float, float] | None = None,
) -> npt.NDArray[np.uint8]:
    """Simulate a round dermoscope field of view on the WHOLE image, then detect and fill it as run time does.

    With probability ``p``, :func:`round_field_surround` blackens everything outside a centred-ish ellipse; the
    result then goes through :func:`~dermnode.inference.artefacts.detect_frame` and
    :func:`~dermnode.inference.artefacts.fill_frame`, exactly what the analyser feeds the networks
    (``ArtefactResult.framed``), so the network learns what it will see at run time: a skin-coloured fill, with
    whatever soft edge or small corner sliver the detection leaves.

    Parameters
    ----------
    rgb : ndarray
        uint8 (H, W, 3) whole image.
    rng : numpy.random.Generator
        Random source (one draw when the field is not applied).
    p : float
        Probability of applying the field.
    centre : tuple of float, optional
        ``(x, y)`` of the lesion centre in pixels (default: the image centre).

    Returns
    -------
    ndarray
        ``rgb`` itself (not applied) or a new uint8 (H, W, 3) image.
    """
    if p <= 0.0 or rng.random() >= p:
        return rgb
    out = round_field_surround(rgb, rng, centre=centre)
    return fill_frame(out, detect_frame(out).frame_mask)


def round_field_surround(
    rgb: npt.NDArray[np.uint8], rng: np.random.Generator, *, centre: tuple[float, float] | None = None
) -> npt.NDArray[np.uint8]:
    """The image seen through a round dermoscope field: a near-black surround outside a centred-ish ellipse.

    The field's centre is the image centre moved by up to 6 % of each side; its mean radius is 0.5-1.0 of the
    half diagonal (from a circle narrower than the shorter side, which blackens two sides, to one that only
    clips the corners); its axis ratio is up to 1.2 and its orientation random. It is enlarged when needed so
    that ``centre`` (the lesion centre) lies within 75 % of its radius. The surround has a level of 0-30, a
    slight per-channel tint and Gaussian noise; the edge is a linear ramp 0.5-4 % of the radius wide.

    Parameters
    ----------
    rgb : ndarray
        uint8 (H, W, 3) whole image.
    rng : numpy.random.Generator
        Random source.
    centre : tuple of float, optional
        ``(x, y)`` of the lesion centre in pixels (default: the image centre).

    Returns
    -------
    ndarray
        A new uint8 (H, W, 3) image, not yet frame-filled.
    """
    h, w = rgb.shape[:2]
    half_diag = 0.5 * math.hypot(w, h)
    fx = w / 2 + float(rng.uniform(-0.06, 0.06)) * w
    fy = h / 2 + float(rng.uniform(-0.06, 0.06)) * h
    r = float(rng.uniform(0.5, 1.0)) * half_diag
    a = float(np.exp(rng.uniform(-0.09, 0.09)))  # axis ratio a^2 <= 1.2
    theta = float(rng.uniform(0.0, math.pi))
    edge = float(rng.uniform(0.005, 0.04)) * r  # soft edge width in pixels
    level = float(rng.uniform(0.0, 30.0))
    tint = rng.uniform(-4.0, 4.0, size=3)
    noise = float(rng.uniform(0.0, 4.0))
    ct, st = math.cos(theta), math.sin(theta)

    def rho(x: npt.NDArray[np.float32], y: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        u, v = (x - fx) * ct + (y - fy) * st, -(x - fx) * st + (y - fy) * ct
        out: npt.NDArray[np.float32] = np.sqrt((u / (r * a)) ** 2 + (v / (r / a)) ** 2).astype(np.float32)
        return out

    lx, ly = centre if centre is not None else (w / 2, h / 2)
    d = float(rho(np.array([lx], np.float32), np.array([ly], np.float32))[0])
    if d > 0.75:
        r *= d / 0.75
        edge *= d / 0.75
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # signed distance to the field's edge, approximately in pixels; 0 inside, 1 in the surround
    t = np.clip((rho(xx, yy) - 1.0) * r / edge + 0.5, 0.0, 1.0)[..., None]
    surround = level + tint + noise * rng.standard_normal((h, w, 3))
    return np.clip(rgb.astype(np.float32) * (1.0 - t) + surround * t, 0, 255).astype(np.uint8)


def augment_crop(
    sample: Sample, size: int, rng: np.random.Generator, rgb: npt.NDArray[np.uint8] | None = None
) -> npt.NDArray[np.uint8]:
    """Random training crop of ``sample`` (geometry only).

    Parameters
    ----------
    sample : Sample
        The sample.
    size : int
        Output side.
    rng : numpy.random.Generator
        Random source.
    rgb : ndarray, optional
        The image to crop instead of ``sample.rgb`` (same size; e.g. after :func:`round_field`).

    Returns
    -------
    ndarray
        uint8 (size, size, 3).
    """
    cx, cy, side = sample.box
    if sample.whole_image:
        side *= float(np.exp(rng.uniform(np.log(0.75), np.log(1.1))))
    else:
        side *= float(np.exp(rng.uniform(np.log(0.8), np.log(1.35))))
    cx += rng.uniform(-0.08, 0.08) * side
    cy += rng.uniform(-0.08, 0.08) * side
    a = float(np.exp(rng.uniform(-0.15, 0.15)))
    crop = warp_crop(
        sample.rgb if rgb is None else rgb,
        (cx, cy, side),
        size,
        angle_deg=float(rng.uniform(-180, 180)),
        scale_x=a,
        scale_y=1.0 / a,
    )
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    r = rng.random()
    if r < 0.15:
        crop = np.asarray(cv2.GaussianBlur(crop, (0, 0), float(rng.uniform(0.5, 1.3))), dtype=np.uint8)
    elif r < 0.3:
        blur = cv2.GaussianBlur(crop, (0, 0), 1.0)
        crop = np.asarray(cv2.addWeighted(crop, 1.6, blur, -0.6, 0), dtype=np.uint8)
    elif r < 0.45:
        f = float(rng.uniform(0.4, 0.8))
        small = cv2.resize(crop, (max(8, int(size * f)),) * 2, interpolation=cv2.INTER_AREA)
        crop = np.asarray(cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
    return np.ascontiguousarray(crop)


def colour_jitter(
    x: npt.NDArray[np.float32],
    rng: np.random.Generator,
    mean: npt.ArrayLike = MEAN,
    std: npt.ArrayLike = STD,
) -> npt.NDArray[np.float32]:
    """Photometric jitter on a normalised CHW input (applied after colour constancy).

    Parameters
    ----------
    x : ndarray
        float32 (3, S, S) from :func:`preprocess_crop`.
    rng : numpy.random.Generator
        Random source.
    mean, std : array-like
        The normalisation ``x`` was made with.

    Returns
    -------
    ndarray
        Jittered input.
    """
    m3 = np.asarray(mean, np.float32)[:, None, None]
    s3 = np.asarray(std, np.float32)[:, None, None]
    img = x * s3 + m3
    img = img * float(rng.uniform(0.8, 1.2))  # brightness
    level = img.mean()
    img = (img - level) * float(rng.uniform(0.8, 1.25)) + level  # contrast
    grey = img.mean(axis=0, keepdims=True)
    img = (img - grey) * float(rng.uniform(0.75, 1.3)) + grey  # saturation
    img = img * rng.uniform(0.93, 1.07, size=(3, 1, 1)).astype(np.float32)  # residual colour cast
    img = np.clip(img, 0.0, 1.0) ** float(np.exp(rng.uniform(-0.2, 0.2)))  # gamma
    return ((img - m3) / s3).astype(np.float32)


class _TrainSet(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    def __init__(
        self,
        samples: list[Sample],
        size: int,
        seed: int,
        normalisation: tuple[npt.ArrayLike, npt.ArrayLike],
        round_field_p: float = 0.0,
    ) -> None:
        self.samples = samples
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.mean, self.std = normalisation
        self.round_field_p = round_field_p

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, i))
        s = self.samples[i]
        rgb = None
        if self.round_field_p > 0.0:
            # its own stream: the other augmentations draw what they draw without the field
            field_rng = np.random.default_rng((self.seed, self.epoch, i, 1))
            rgb = round_field(s.rgb, field_rng, p=self.round_field_p, centre=(s.box[0], s.box[1]))
        x = colour_jitter(
            preprocess_crop(augment_crop(s, self.size, rng, rgb), self.mean, self.std), rng, self.mean, self.std
        )
        return (
            torch.from_numpy(x),
            torch.tensor(float(s.melanoma)),
            torch.tensor(s.diagnosis, dtype=torch.long),
        )


def eval_batch(
    samples: list[Sample],
    size: int,
    margin: float = DEFAULT_MARGIN,
    normalisation: tuple[npt.ArrayLike, npt.ArrayLike] = (MEAN, STD),
) -> npt.NDArray[np.float32]:
    """Deterministic inference-time inputs (crop box, no augmentation) for ``samples``.

    Parameters
    ----------
    samples : list of Sample
        Samples.
    size : int
        Input side.
    margin : float
        Crop margin; the stored boxes (built with ``DEFAULT_MARGIN``) are rescaled by
        ``(1 + 2 margin) / (1 + 2 DEFAULT_MARGIN)`` around their centre.
    normalisation : tuple
        ``(mean, std)`` of the network (:func:`classifier_normalisation`).

    Returns
    -------
    ndarray
        float32 (N, 3, size, size).
    """
    if not samples:
        return np.zeros((0, 3, size, size), dtype=np.float32)
    f = (1.0 + 2.0 * margin) / (1.0 + 2.0 * DEFAULT_MARGIN)
    mean, std = normalisation
    return np.stack(
        [preprocess_crop(warp_crop(s.rgb, (s.box[0], s.box[1], s.box[2] * f), size), mean, std) for s in samples]
    )


def batched_logits(
    model: nn.Module, inputs: npt.NDArray[np.float32], *, tta: bool, batch: int = 64
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """:func:`predict_logits` over a large array in chunks.

    Parameters
    ----------
    model : DermNet or DermNetEnsemble
        Model in eval mode.
    inputs : ndarray
        float32 (N, 3, S, S).
    tta : bool
        Flip test-time augmentation.
    batch : int
        Chunk size.

    Returns
    -------
    tuple of ndarray
        ``(melanoma_logits (N,), diagnosis_logits (N, K))``.
    """
    mels, diags = [], []
    for i in range(0, len(inputs), batch):
        m, d = predict_logits(model, inputs[i : i + batch], tta=tta)
        mels.append(m)
        diags.append(d)
    if not mels:
        return np.zeros(0), np.zeros((0, len(DIAGNOSIS_CLASSES)))
    return np.concatenate(mels), np.concatenate(diags)


def _plot_history(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(ep, [h["train_loss"] for h in history], label="train loss")
    ax[0].set_xlabel("epoch")
    ax[0].legend()
    ax[1].plot(ep, [h["val_auc_isic2017"] for h in history], label="ISIC2017 val melanoma AUC")
    ax[1].plot(ep, [h["val_auc_mel_9class"] for h in history], label="9-class val MEL-vs-rest AUC")
    ax[1].plot(ep, [h["val_bacc_9class"] for h in history], label="9-class val balanced acc.")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylim(0, 1)
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _safe_auc(y: npt.NDArray[np.int64], s: npt.NDArray[np.float64]) -> float:
    if len(np.unique(y)) < 2:
        return float("nan")
    return roc_auc(y, s)


class _ClassificationTask:
    """:class:`~dermnode.training.loop.Task` hooks of the classifier training (masked two-head loss)."""

    def __init__(
        self,
        dataset: _TrainSet,
        batch_size: int,
        seed: int,
        bce: nn.BCEWithLogitsLoss,
        ce: nn.CrossEntropyLoss,
        val17: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
        val9: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
    ) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.bce, self.ce = bce, ce
        self.val17, self.val9 = val17, val9

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self.dataset.epoch = epoch
        g = torch.Generator()
        g.manual_seed(self.seed * 1000 + epoch)
        yield from torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=True, generator=g, drop_last=True
        )

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, ym, yd = batch
        lm, ld = model(x.contiguous(memory_format=torch.channels_last))
        mm = ym >= 0
        loss_m = (self.bce(lm, ym.clamp(min=0)) * mm).sum() / mm.sum().clamp(min=1)
        md = yd >= 0
        loss_d = self.ce(ld[md], yd[md]) / md.sum().clamp(min=1) if md.any() else lm.sum() * 0.0
        loss: torch.Tensor = loss_m + 0.5 * loss_d
        return loss

    def validate(self, model: nn.Module, epoch: int) -> tuple[float, dict[str, Any]]:
        (x17, y17), (x9, y9) = self.val17, self.val9
        m17, _ = batched_logits(model, x17, tta=False)
        m9, d9 = batched_logits(model, x9, tta=False)
        auc17 = _safe_auc(y17, m17)
        metrics = {
            "val_auc_isic2017": auc17,
            "val_auc_mel_9class": _safe_auc((y9 == CLASS_INDEX["MEL"]).astype(np.int64), m9),
            "val_bacc_9class": balanced_accuracy(y9, d9.argmax(1)) if len(y9) else float("nan"),
        }
        print(json.dumps({"epoch": epoch + 1, **metrics}), flush=True)
        return (auc17 if not math.isnan(auc17) else metrics["val_auc_mel_9class"]), metrics

    def on_best(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        """Nothing to do: the best weights are calibrated and exported after training."""


def train_classification(
    data_dirs: list[Path],
    arch: str,
    out_dir: Path,
    *,
    epochs: int,
    image_size: int,
    batch_size: int,
    seed: int,
    resume: bool,
    threads: int,
    lr: float = 3e-3,
    weight_decay: float = 0.05,
    version: str = "1.0.0",
    limit: int | None = None,
    split_seed: int = 0,
    pretrained: bool = True,
    tta: bool = True,
    round_field_p: float = 0.0,
    fill_frames: bool = False,
) -> Path:
    """Train the classifier, calibrate it and export the fp16 bundle.

    Parameters
    ----------
    data_dirs : list of Path
        Shared data root or dataset folders (``isic2017``, ``isic-9class``).
    arch : str
        A ``dermnet-*`` variant (:data:`~dermnode.inference.classifier_models.ARCHS`, trained from scratch) or a
        timm backbone of :data:`~dermnode.inference.classifier_models.TIMM_BACKBONES` (ImageNet-initialised).
    out_dir : Path
        Run folder: ``checkpoint.pt``, ``history.json``, ``training_curves.png``, ``classifier.{pt,json}``.
    epochs : int
        Number of epochs.
    image_size : int
        Input crop side in pixels.
    batch_size : int
        Mini-batch size.
    seed : int
        Seed of every random source.
    resume : bool
        Continue from ``out_dir/checkpoint.pt`` when it exists.
    threads : int
        Torch intra-op threads (and OpenCV threads).
    lr : float
        Peak learning rate.
    weight_decay : float
        AdamW weight decay.
    version : str
        Version written to the manifest.
    limit : int, optional
        Use at most this many training samples (smoke tests).
    split_seed : int
        Seed of the isic-9class train/val split (keep it fixed across runs so that an ensemble of runs with
        different ``seed`` values shares one validation set).
    pretrained : bool
        Start a timm backbone from its ImageNet weights (:mod:`dermnode.training.backbones`).
    tta : bool
        Calibrate (and let inference use) the 4-flip test-time augmentation.
    round_field_p : float
        Probability of the simulated round dermoscope field (:func:`round_field`) per training image (0, the
        default: none, the 2.0.0 recipe; :data:`ROUND_FIELD_P` for the 2.1.0 experiment).
    fill_frames : bool
        Give every image (training and validation) its dermoscope frame filled, as the analyser gives it to the
        network at run time (:func:`~dermnode.inference.artefacts.detect_frame`,
        :func:`~dermnode.inference.artefacts.fill_frame`); the epoch is then chosen and the temperatures fitted on
        what the service sees. Default ``False``: the 2.0.0 recipe (raw images).

    Returns
    -------
    Path
        The exported manifest ``out_dir/classifier.json``.

    Raises
    ------
    PipelineError
        When the data cannot be loaded or there is nothing to train on.
    ValueError
        When ``arch`` is unknown.
    """

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, threads))
    cv2.setNumThreads(max(1, threads))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    t0 = time.time()
    samples = load_samples(data_dirs, seed=split_seed, splits=("train", "val"))
    if fill_frames:
        samples = [frame_filled(s) for s in samples]
    train = [s for s in samples if s.split == "train"]
    if limit is not None:
        train = train[:: max(1, len(train) // limit)][:limit]
    val17 = [s for s in samples if s.split == "val" and s.source == "isic2017"]
    val9 = [s for s in samples if s.split == "val" and s.source == "isic-9class"]
    if not train:
        raise PipelineError("no training samples")
    logger.info(
        "train %d, val isic2017 %d, val 9-class %d (%.0fs)", len(train), len(val17), len(val9), time.time() - t0
    )

    mel = np.array([s.melanoma for s in train])
    n_pos, n_neg = int((mel == 1).sum()), int((mel == 0).sum())
    pos_weight = math.sqrt(n_neg / max(n_pos, 1))
    diag = np.array([s.diagnosis for s in train])
    counts = np.array([(diag == c).sum() for c in range(len(DIAGNOSIS_CLASSES))], dtype=np.float64)
    cw = 1.0 / np.sqrt(np.maximum(counts, 1.0))
    cw = cw / (cw * counts).sum() * counts.sum()
    logger.info(
        "melanoma pos/neg %d/%d pos_weight %.2f; diagnosis counts %s", n_pos, n_neg, pos_weight, counts.tolist()
    )

    model = build_classifier(arch)
    if pretrained and arch in TIMM_BACKBONES:
        from dermnode.training.backbones import load_into

        load_into(model, arch, prefix="backbone.")
    norm = classifier_normalisation(model)
    model = model.to(memory_format=torch.channels_last)  # much faster depthwise convolutions on CPU
    dataset = _TrainSet(train, image_size, seed, norm, round_field_p)
    steps_per_epoch = len(train) // batch_size
    if steps_per_epoch < 1:
        raise PipelineError(f"{len(train)} training samples do not fill one batch of {batch_size}")
    total_steps = epochs * steps_per_epoch
    task = _ClassificationTask(
        dataset,
        batch_size,
        seed,
        nn.BCEWithLogitsLoss(reduction="none", pos_weight=torch.tensor(pos_weight)),
        nn.CrossEntropyLoss(weight=torch.tensor(cw, dtype=torch.float32), label_smoothing=0.05, reduction="sum"),
        (eval_batch(val17, image_size, normalisation=norm), np.array([s.melanoma for s in val17], dtype=np.int64)),
        (eval_batch(val9, image_size, normalisation=norm), np.array([s.diagnosis for s in val9], dtype=np.int64)),
    )
    cfg = FitConfig(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=min(2 * steps_per_epoch, total_steps // 10 + 1),
        ema_decay=0.998 if total_steps > 2000 else 0.99,
        seed=seed,
        grad_clip=5.0,
        progress="classification",
    )
    result = fit(model, task, cfg, out_dir, resume=resume, meta={"arch": arch, "image_size": image_size})
    history = result.history
    best_state = result.best_state
    _plot_history(history, out_dir / "training_curves.png")
    if best_state is None:
        raise PipelineError("training produced no model")
    final = build_classifier(arch)
    final.load_state_dict(best_state)
    final.eval()
    return _calibrate_and_export(
        final,
        arch,
        image_size,
        val17,
        val9,
        history,
        out_dir,
        version,
        seed,
        epochs,
        tta=tta,
        split_seed=split_seed,
        round_field_p=round_field_p,
        fill_frames=fill_frames,
    )


def _best_epoch(history: list[dict[str, float]]) -> int:
    def key(h: dict[str, float]) -> float:
        v = h["val_auc_isic2017"]
        return h["val_auc_mel_9class"] if math.isnan(v) else v

    return int(max(history, key=key)["epoch"]) if history else 0


def _calibrate_and_export(
    final: ClassifierNet,
    arch: str,
    image_size: int,
    val17: list[Sample],
    val9: list[Sample],
    history: list[dict[str, float]],
    out_dir: Path,
    version: str,
    seed: int,
    epochs: int,
    margin: float = DEFAULT_MARGIN,
    tta: bool = True,
    split_seed: int | None = None,
    round_field_p: float | None = None,
    fill_frames: bool = False,
) -> Path:
    """Fit the temperatures on the validation logits (with the inference TTA), report ECE, export the bundle."""
    norm = classifier_normalisation(final)
    x17 = eval_batch(val17, image_size, margin, norm)
    x9 = eval_batch(val9, image_size, margin, norm)
    y17 = np.array([s.melanoma for s in val17], dtype=np.int64)
    y9 = np.array([s.diagnosis for s in val9], dtype=np.int64)
    m17, d17 = batched_logits(final, x17, tta=tta)
    _, d9 = batched_logits(final, x9, tta=tta)
    calib: dict[str, Any] = {}
    t_mel = 1.0
    if len(np.unique(y17)) == 2:
        t_mel = fit_temperature(m17, y17)
        calib["melanoma_ece_before"] = expected_calibration_error(y17, sigmoid(m17))
        calib["melanoma_ece_after"] = expected_calibration_error(y17, sigmoid(m17 / t_mel))
        calib["melanoma_auc_val_tta"] = roc_auc(y17, m17)
    dl_mask17 = np.array([s.diagnosis >= 0 for s in val17], dtype=bool)
    zd = np.concatenate([d9, d17[dl_mask17]])
    yd = np.concatenate([y9, np.array([s.diagnosis for s in val17], dtype=np.int64)[dl_mask17]])
    t_diag = 1.0
    if len(yd):
        t_diag = fit_temperature(zd, yd)
        calib["diagnosis_ece_before"] = expected_calibration_error(yd, softmax(zd))
        calib["diagnosis_ece_after"] = expected_calibration_error(yd, softmax(zd / t_diag))
        calib["diagnosis_bacc_val_tta"] = balanced_accuracy(yd, zd.argmax(1))
    calib["temperature_melanoma"] = t_mel
    calib["temperature_diagnosis"] = t_diag
    logger.info("calibration: %s", calib)
    best_epoch = _best_epoch(history)
    (out_dir / "history.json").write_text(
        json.dumps({"history": history, "calibration": calib, "best_epoch": best_epoch}, indent=1)
    )
    extra = {
        "best_epoch": best_epoch,
        "epochs": epochs,
        "seed": seed,
        "split_seed": seed if split_seed is None else split_seed,
        "parameters": int(sum(p.numel() for p in final.parameters())),
        "validation": calib,
    }
    if round_field_p is not None:
        extra["round_field_p"] = round_field_p
    if fill_frames:
        extra["fill_frames"] = True
    path = save_classifier(
        final,
        out_dir,
        input_size=image_size,
        temperatures=(t_mel, t_diag),
        version=version,
        extra=extra,
        margin=margin,
        tta=tta,
    )
    logger.info("exported %s", path)
    return path


def export_from_checkpoint(
    data_dirs: list[Path],
    run_dir: Path,
    *,
    version: str = "1.0.0",
    seed: int = 0,
    margin: float = DEFAULT_MARGIN,
    tta: bool = True,
    fill_frames: bool = False,
) -> Path:
    """Calibrate and export the best model of a (finished or interrupted) run from its ``checkpoint.pt``.

    Parameters
    ----------
    data_dirs : list of Path
        Data root(s) (for the validation images).
    run_dir : Path
        Run folder holding ``checkpoint.pt``.
    version : str
        Version written to the manifest.
    seed : int
        Seed used for the isic-9class train/val split (must match the training run).
    margin : float
        Crop margin used at inference (stored in the manifest; the temperatures are fitted with it).
    tta : bool
        Whether inference uses the 4-flip test-time augmentation (the temperatures are fitted with it).
    fill_frames : bool
        Fit the temperatures on frame-filled validation images (as a run trained with ``fill_frames`` was).

    Returns
    -------
    Path
        The exported manifest ``run_dir/classifier.json``.

    Raises
    ------
    PipelineError
        When the checkpoint is missing or holds no model.
    """
    ck_path = Path(run_dir) / "checkpoint.pt"
    if not ck_path.is_file():
        raise PipelineError(f"no checkpoint at {ck_path}")
    ck = torch.load(ck_path, map_location="cpu", weights_only=False)
    if ck.get("best_state") is None:
        raise PipelineError(f"checkpoint {ck_path} holds no model")
    arch, image_size = str(ck["arch"]), int(ck["image_size"])
    final = build_classifier(arch)
    final.load_state_dict(ck["best_state"])
    final.eval()
    samples = load_samples(data_dirs, seed=seed, splits=("val",))
    if fill_frames:
        samples = [frame_filled(s) for s in samples]
    val17 = [s for s in samples if s.source == "isic2017"]
    val9 = [s for s in samples if s.source == "isic-9class"]
    history = list(ck["history"])
    return _calibrate_and_export(
        final,
        arch,
        image_size,
        val17,
        val9,
        history,
        Path(run_dir),
        version,
        seed,
        int(ck.get("epochs", len(history))),
        margin,
        tta,
        fill_frames=fill_frames,
    )


def export_ensemble(
    data_dirs: list[Path],
    run_dirs: list[Path],
    out_dir: Path,
    *,
    version: str = "1.0.0",
    split_seed: int = 0,
    margin: float = DEFAULT_MARGIN,
    final_weights: bool = False,
) -> Path:
    """Average the best models of several runs (same input size), calibrate the ensemble and export it.

    Parameters
    ----------
    data_dirs : list of Path
        Data root(s) (for the validation images).
    run_dirs : list of Path
        Run folders holding ``checkpoint.pt`` (runs with different seeds, same ``split_seed``).
    out_dir : Path
        Output folder for ``classifier.{pt,json}`` and ``history.json``.
    version : str
        Version written to the manifest.
    split_seed : int
        Seed of the isic-9class train/val split shared by the runs.
    margin : float
        Crop margin used at inference.
    final_weights : bool
        Use each run's last EMA weights instead of its best-validation-epoch weights.

    Returns
    -------
    Path
        The exported manifest.

    Raises
    ------
    PipelineError
        When a checkpoint is missing or the runs use different input sizes.
    """
    states, variants, sizes, histories = [], [], set(), []
    for rd in run_dirs:
        ck_path = Path(rd) / "checkpoint.pt"
        if not ck_path.is_file():
            raise PipelineError(f"no checkpoint at {ck_path}")
        ck = torch.load(ck_path, map_location="cpu", weights_only=False)
        if ck.get("best_state") is None:
            raise PipelineError(f"checkpoint {ck_path} holds no model")
        states.append(ck["ema"] if final_weights else ck["best_state"])
        variants.append(str(ck["arch"]))
        sizes.add(int(ck["image_size"]))
        histories.append(list(ck["history"]))
    if len(sizes) != 1:
        raise PipelineError(f"runs use different input sizes {sorted(sizes)}")
    ens = DermNetEnsemble(variants)
    for member, state in zip(ens.members, states, strict=True):
        member.load_state_dict(state)
    ens.eval()
    samples = load_samples(data_dirs, seed=split_seed, splits=("val",))
    val17 = [s for s in samples if s.source == "isic2017"]
    val9 = [s for s in samples if s.source == "isic-9class"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return _calibrate_and_export(
        ens,
        "+".join(variants),
        sizes.pop(),
        val17,
        val9,
        histories[0],
        out_dir,
        version,
        split_seed,
        max(len(h) for h in histories),
        margin,
    )
