"""Training of the lesion segmentation network on ISIC 2017 (official train split; val for model selection).

The whole split is loaded once into memory as uint8 arrays. Each epoch draws fresh augmentations (flips,
free rotation, scale and aspect-ratio jitter, translation, black-frame or reflected borders, colour,
gamma and blur jitter), so the network does not learn the 256x256 stretch of the ISIC copies. The loss is
BCE + soft Dice; the optimisation (AdamW, warm-up and cosine decay, an exponential moving average (EMA) of
the weights) is the shared :func:`dermnode.training.loop.fit`; the EMA weights are validated after each epoch
and the best ones (mean val Dice after post-processing) are exported as ``out_dir/segmentation.pt`` + ``.json``.
``out_dir/checkpoint.pt`` holds everything needed to resume (``resume=True``), ``history.json`` and
``training_curve.png`` the learning curves.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dermnode.errors import ModelError
from dermnode.evaluation.segmentation_metrics import mean_scores, score_masks
from dermnode.inference.registry import build_architecture, load_model_bundle, save_model_bundle
from dermnode.inference.segmentation import postprocess
from dermnode.training.loop import FitConfig, fit

logger = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MODEL_NAME = "segmentation"
MODEL_VERSION = "1.0.0"


@dataclass(frozen=True)
class SegmentationDataset:
    """A split held in memory: images ``(N, H, W, 3)`` uint8 RGB, masks ``(N, H, W)`` uint8 0/1."""

    ids: list[str]
    images: npt.NDArray[np.uint8]
    masks: npt.NDArray[np.uint8]


def load_segmentation_split(
    data_dir: Path, split: str, limit: int | None = None, frame: tuple[int, int] | None = None
) -> SegmentationDataset:
    """Load every image and mask of one split of ``data_dir/labels.csv`` into memory.

    With ``frame`` every image is presented as the service presents a real image to a network with that
    (landscape) working frame: in its original aspect ratio (``orig_width``/``orig_height`` undo the ISIC
    copies' 256x256 stretch), portrait images turned to landscape, then resized to the frame.

    Parameters
    ----------
    data_dir:
        Folder with ``labels.csv`` (columns ``image_id``, ``split``), ``images/<id>.jpg`` and
        ``masks/<id>.png``.
    split:
        Value of the ``split`` column (``"train"`` or ``"val"``); ``"all"`` takes every row (also when the
        file has no ``split`` column).
    limit:
        Load at most this many images (smoke runs).
    frame:
        ``(height, width)`` to load every image at (see above); ``None`` keeps the files' size (all images
        resized to the size of the first one if sizes differ).

    Returns
    -------
    SegmentationDataset
        The split.

    Raises
    ------
    FileNotFoundError
        When ``labels.csv`` or an image or mask file is missing.
    ValueError
        When the split is empty.
    """
    data_dir = Path(data_dir)
    with open(data_dir / "labels.csv", newline="", encoding="utf-8") as fh:
        rows = [row for row in csv.DictReader(fh) if split == "all" or row.get("split") == split]
    if limit is not None:
        rows = rows[:limit]
    ids = [row["image_id"] for row in rows]
    portrait = {row["image_id"] for row in rows if _int(row.get("orig_height")) > _int(row.get("orig_width"))}
    if not ids:
        raise ValueError(f"split {split!r} of {data_dir} is empty")
    images: list[npt.NDArray[np.uint8]] = []
    masks: list[npt.NDArray[np.uint8]] = []
    size: tuple[int, int] | None = None
    for image_id in tqdm(ids, desc=f"load {split}", mininterval=5, leave=False):
        img_path, mask_path = data_dir / "images" / f"{image_id}.jpg", data_dir / "masks" / f"{image_id}.png"
        bgr = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
        gt = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if bgr is None or gt is None:
            raise FileNotFoundError(f"cannot read {img_path} or {mask_path}")
        if frame is not None and image_id in portrait:
            bgr, gt = np.ascontiguousarray(bgr.transpose(1, 0, 2)), np.ascontiguousarray(gt.T)
        if size is None:
            size = (frame[1], frame[0]) if frame is not None else (bgr.shape[1], bgr.shape[0])
        if (bgr.shape[1], bgr.shape[0]) != size:
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        if (gt.shape[1], gt.shape[0]) != size:
            gt = cv2.resize(gt, size, interpolation=cv2.INTER_NEAREST)
        images.append(np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8))
        masks.append((gt > 127).astype(np.uint8))
    return SegmentationDataset(ids=ids, images=np.stack(images), masks=np.stack(masks))


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _concatenate(a: SegmentationDataset, b: SegmentationDataset) -> SegmentationDataset:
    """``a`` followed by ``b``, ``b`` resized to ``a``'s image size when it differs."""
    h, w = a.images.shape[1:3]
    images, masks = b.images, b.masks
    if images.shape[1:3] != (h, w):
        images = np.stack([cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR) for im in images])
        masks = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST) for m in masks])
    return SegmentationDataset(
        ids=[*a.ids, *b.ids],
        images=np.concatenate([a.images, images]),
        masks=np.concatenate([a.masks, masks]),
    )


def augment(
    image: npt.NDArray[np.uint8], mask: npt.NDArray[np.uint8], size: int | tuple[int, int], rng: np.random.Generator
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Randomly transform one image/mask pair to ``size x size`` (or ``(height, width)``).

    Geometry (one affine warp): flips, rotation, zoom 0.7-1.35, aspect ratio 0.75-1.33, shift up to 10 %;
    the border is reflected or black (a dermoscope frame). Colour: brightness, contrast, saturation, hue,
    gamma, sometimes blur.

    Parameters
    ----------
    image:
        ``(H, W, 3)`` uint8 RGB.
    mask:
        ``(H, W)`` uint8 0/1.
    size:
        Output side length, or ``(height, width)``.
    rng:
        Random generator.

    Returns
    -------
    tuple
        Image as ``(height, width, 3)`` float32 in 0..1 and mask as ``(height, width)`` float32 0/1.
    """
    h, w = mask.shape
    oh, ow = (size, size) if isinstance(size, int) else size
    zoom = math.exp(rng.uniform(math.log(0.7), math.log(1.35)))
    aspect = math.exp(rng.uniform(math.log(0.75), math.log(1.333)))
    sx = ow / w * zoom * math.sqrt(aspect)
    sy = oh / h * zoom / math.sqrt(aspect)
    angle = rng.uniform(0, 2 * math.pi) if rng.random() < 0.8 else 0.0
    fx = -1.0 if rng.random() < 0.5 else 1.0
    fy = -1.0 if rng.random() < 0.5 else 1.0
    c, s = math.cos(angle), math.sin(angle)
    A = np.array([[c, -s], [s, c]]) @ np.diag([sx * fx, sy * fy])
    centre_src = np.array([w / 2.0, h / 2.0])
    centre_dst = np.array([ow / 2.0, oh / 2.0]) + rng.uniform(-0.1, 0.1, 2) * np.array([ow, oh])
    M = np.hstack([A, (centre_dst - A @ centre_src)[:, None]]).astype(np.float64)
    black = rng.random() < 0.3
    border = cv2.BORDER_CONSTANT if black else cv2.BORDER_REFLECT_101
    img = cv2.warpAffine(image, M, (ow, oh), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0)
    msk = cv2.warpAffine(
        mask.astype(np.float32), M, (ow, oh), flags=cv2.INTER_LINEAR, borderMode=border, borderValue=0
    )
    x = img.astype(np.float32) * (1.0 / 255.0)
    # colour jitter in HSV (hue in degrees for float images)
    if rng.random() < 0.8:
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-12, 12)) % 360.0
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.7, 1.3), 0, 1)
        x = np.asarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), dtype=np.float32)
    x = x * rng.uniform(0.75, 1.25)  # brightness
    m = float(x.mean())
    x = (x - m) * rng.uniform(0.75, 1.3) + m  # contrast
    x = x * rng.uniform(0.92, 1.08, 3).astype(np.float32)  # white balance
    x = np.clip(x, 0.0, 1.0)
    if rng.random() < 0.5:
        x = x ** rng.uniform(0.75, 1.35)
    if rng.random() < 0.2:
        x = np.asarray(cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.2)), dtype=np.float32)
    return x.astype(np.float32), (msk > 0.5).astype(np.float32)


Normalisation = tuple[tuple[float, float, float], tuple[float, float, float]]


def normalisation_for(arch: str, arch_kwargs: dict[str, Any]) -> Normalisation:
    """``(mean, std)`` on 0..1 RGB: the pretrained encoder's for ``smp_unet``, ImageNet's otherwise."""
    if arch == "smp_unet":
        from dermnode.inference.architectures import SMP_ENCODERS

        return SMP_ENCODERS[str(arch_kwargs.get("encoder", "tu-tf_efficientnet_lite0"))]
    return MEAN, STD


def _normalise_batch(x: npt.NDArray[np.float32], norm: Normalisation = (MEAN, STD)) -> torch.Tensor:
    """``(N, H, W, 3)`` float 0..1 -> normalised ``(N, 3, H, W)`` channels-last tensor."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    t = (t - torch.tensor(norm[0]).view(1, 3, 1, 1)) / torch.tensor(norm[1]).view(1, 3, 1, 1)
    return t.contiguous(memory_format=torch.channels_last)


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice loss (Dice computed per image, then averaged).

    Parameters
    ----------
    logits, target:
        ``(N, 1, H, W)`` tensors.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    dice = (2 * inter + 1.0) / (p.sum(1) + t.sum(1) + 1.0)
    return bce + (1.0 - dice).mean()


@torch.no_grad()
def predict_probabilities(
    module: nn.Module,
    images: npt.NDArray[np.uint8],
    size: int | tuple[int, int],
    batch_size: int = 16,
    norm: Normalisation = (MEAN, STD),
) -> npt.NDArray[np.float32]:
    """Lesion probabilities of a stack of images at ``size x size`` or ``(height, width)`` (no TTA).

    Parameters
    ----------
    module:
        Segmentation network (put in eval mode here).
    images:
        ``(N, H, W, 3)`` uint8 RGB.
    size:
        Network input size.
    batch_size:
        Images per forward pass.
    norm:
        The network's input normalisation.

    Returns
    -------
    numpy.ndarray
        ``(N, size, size)`` float32.
    """
    module.eval()
    out: list[npt.NDArray[np.float32]] = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        oh, ow = (size, size) if isinstance(size, int) else size
        x = np.stack([cv2.resize(im, (ow, oh), interpolation=cv2.INTER_AREA) for im in chunk])
        t = _normalise_batch(x.astype(np.float32) / 255.0, norm)
        out.append(torch.sigmoid(module(t))[:, 0].numpy().astype(np.float32))
    return np.concatenate(out)


def validate(
    module: nn.Module, data: SegmentationDataset, size: int | tuple[int, int], norm: Normalisation = (MEAN, STD)
) -> dict[str, float]:
    """Mean metrics of ``module`` on ``data`` after the full post-processing, at the masks' resolution.

    Parameters
    ----------
    module:
        Segmentation network.
    data:
        Validation split.
    size:
        Network input size.
    norm:
        The network's input normalisation.

    Returns
    -------
    dict
        Mean Dice, Jaccard, thresholded Jaccard, pixel accuracy, sensitivity, specificity.
    """
    probs = predict_probabilities(module, data.images, size, norm=norm)
    h, w = data.masks.shape[1:]
    scores = []
    for prob, gt in zip(probs, data.masks, strict=True):
        full = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
        scores.append(score_masks(postprocess(full), gt.astype(bool)))
    return mean_scores(scores).to_json()


def _plot_history(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss (BCE+Dice)")
    ax1.set_xlabel("epoch")
    ax1.legend()
    for key in ("dice", "jaccard", "thresholded_jaccard"):
        ax2.plot(epochs, [h["val"][key] for h in history], label=f"val {key}")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0.5, 1.0)
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_segmentation(
    data_dir: Path,
    arch: str,
    out_dir: Path,
    *,
    epochs: int,
    image_size: int,
    batch_size: int,
    seed: int,
    resume: bool,
    threads: int,
    arch_kwargs: dict[str, Any] | None = None,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    limit: int | None = None,
    time_budget_s: float | None = None,
    extra_train_dirs: Sequence[Path] = (),
    init_from: Path | None = None,
    frame: tuple[int, int] | None = None,
    pretrained: bool = True,
    version: str = MODEL_VERSION,
) -> Path:
    """Train a segmentation network and export the best epoch.

    Parameters
    ----------
    data_dir:
        ISIC 2017 folder (``labels.csv``, ``images/``, ``masks/``).
    arch:
        Registered architecture name (e.g. ``"lite_unet"``).
    out_dir:
        Output folder: ``checkpoint.pt``, ``history.json``, ``training_curve.png``, ``segmentation.pt``,
        ``segmentation.json``.
    epochs:
        Total number of epochs (also when resuming).
    image_size:
        Training and inference side length (a multiple of 32).
    batch_size:
        Images per step.
    seed:
        Seed of every random generator.
    resume:
        Continue from ``out_dir/checkpoint.pt`` when it exists.
    threads:
        ``torch.set_num_threads`` value (0 keeps torch's default).
    arch_kwargs:
        Constructor arguments of the architecture.
    lr, weight_decay:
        AdamW peak learning rate and weight decay.
    limit:
        Use only the first ``limit`` images of each split (smoke runs).
    time_budget_s:
        Optional wall-clock budget for the training loop (summed over resumed runs). After each epoch the
        number of epochs is cut to what fits the budget at the measured mean epoch time, and the cosine
        learning-rate schedule is stretched or shrunk to end with the last epoch.
    extra_train_dirs:
        More training data laid out like ``data_dir`` (e.g. pseudo-labels written by
        :func:`dermnode.training.pseudo_labels.write_pseudo_labels`): their ``train`` rows are added to the
        training set (resized to its image size). Validation always uses ``data_dir``'s ``val`` split.
    init_from:
        Folder of an exported ``segmentation.pt``/``.json`` of the same architecture whose weights start the
        training (fine-tuning) instead of a random initialisation; ignored when resuming a checkpoint.
    frame:
        ``(height, width)`` landscape working frame (multiples of 32) instead of the square ``image_size``:
        images keep their original aspect ratio (see :func:`load_segmentation_split`, loaded at 1.25 times
        the frame for the augmentation), and the exported model works in the frame, turned for portrait
        images (manifest ``extra.frame_follows_orientation``).
    pretrained:
        Start the encoder of an ``smp_unet`` from its ImageNet weights (:mod:`dermnode.training.backbones`).
    version:
        Version written to the manifest.

    Returns
    -------
    pathlib.Path
        Path of the exported ``segmentation.pt``.

    Raises
    ------
    ModelError
        When the checkpoint cannot be resumed or no epoch was completed.
    ValueError
        When ``image_size`` is not a positive multiple of 32.
    """
    if image_size <= 0 or image_size % 32:
        raise ValueError("image_size must be a positive multiple of 32")
    if frame is not None and (min(frame) <= 0 or frame[0] % 32 or frame[1] % 32):
        raise ValueError("frame must be positive multiples of 32")
    work: tuple[int, int] = frame if frame is not None else (image_size, image_size)
    store = (round(work[0] * 1.25), round(work[1] * 1.25)) if frame is not None else None
    if threads > 0:
        torch.set_num_threads(threads)
    cv2.setNumThreads(1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    train = load_segmentation_split(data_dir, "train", limit, store)
    n_labelled = len(train.ids)
    for extra_dir in extra_train_dirs:
        train = _concatenate(train, load_segmentation_split(Path(extra_dir), "train", limit, store))
    val = load_segmentation_split(data_dir, "val", limit, store)
    logger.info("train %d images, val %d images", len(train.ids), len(val.ids))
    training_data = f"{Path(data_dir).name} train split ({n_labelled} images)"
    if len(train.ids) > n_labelled:
        extra = ", ".join(Path(d).name for d in extra_train_dirs)
        training_data += f" + {len(train.ids) - n_labelled} images from {extra}"
    if init_from is not None:
        training_data += f"; fine-tuned from {Path(init_from).name}"
    kwargs = dict(arch_kwargs or {})
    norm = normalisation_for(arch, kwargs)
    model = build_architecture(arch, kwargs).to(memory_format=torch.channels_last)
    if pretrained and init_from is None and arch == "smp_unet":
        from dermnode.training.backbones import load_into

        encoder = str(kwargs.get("encoder", "tu-tf_efficientnet_lite0"))
        load_into(model, encoder.removeprefix("tu-"), prefix="encoder.model.")
        training_data += f"; encoder initialised from ImageNet {encoder.removeprefix('tu-')}"
    if init_from is not None:
        start = load_model_bundle(Path(init_from), MODEL_NAME)
        if start.manifest.arch != arch or dict(start.manifest.arch_kwargs) != kwargs:
            raise ModelError(f"{init_from}: architecture {start.manifest.arch} {start.manifest.arch_kwargs} "
                             f"differs from {arch} {kwargs}")
        model.load_state_dict({k: v.float() for k, v in start.module.state_dict().items()})
        logger.info("weights initialised from %s (sha256 %s)", init_from, start.identity.sha256[:12])
    steps_per_epoch = max(1, len(train.ids) // batch_size)
    exported = out_dir / f"{MODEL_NAME}.pt"

    def export(module: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        save_model_bundle(
            module,
            out_dir,
            name=MODEL_NAME,
            version=version,
            arch=arch,
            input_size=work,
            mean=norm[0],
            std=norm[1],
            arch_kwargs=kwargs,
            extra={
                "threshold": 0.5,
                "tta": False,
                "frame_follows_orientation": frame is not None,
                "task": "binary lesion segmentation (dermoscopy)",
                "training_data": training_data,
                "selected_epoch": epoch + 1,
                "val_metrics_during_training": metrics["val"],
            },
        )

    task = _SegmentationTask(train, val, work, norm, batch_size, steps_per_epoch, seed, export)
    cfg = FitConfig(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=min(steps_per_epoch, max(1, epochs * steps_per_epoch // 10)),
        ema_decay=0.995 if steps_per_epoch > 20 else 0.9,
        seed=seed,
        time_budget_s=time_budget_s,
        progress="segmentation",
    )
    result = fit(model, task, cfg, out_dir, resume=resume,
                 meta={"arch": arch, "arch_kwargs": kwargs, "image_size": image_size, "frame": list(work)})
    _plot_history(result.history, out_dir / "training_curve.png")
    if not exported.exists():
        raise ModelError(f"training produced no model in {out_dir}")
    return exported


class _SegmentationTask:
    """:class:`~dermnode.training.loop.Task` hooks of the segmentation training."""

    def __init__(
        self,
        train: SegmentationDataset,
        val: SegmentationDataset,
        work: tuple[int, int],
        norm: Normalisation,
        batch_size: int,
        steps_per_epoch: int,
        seed: int,
        export: Callable[[nn.Module, int, dict[str, Any]], None],
    ) -> None:
        self.train, self.val, self.work, self.norm = train, val, work, norm
        self.batch_size, self.steps_per_epoch, self.seed = batch_size, steps_per_epoch, seed
        self.export = export

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.train.ids))
        for step in range(self.steps_per_epoch):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            pairs = [augment(self.train.images[i], self.train.masks[i], self.work, rng) for i in idx]
            x = _normalise_batch(np.stack([p[0] for p in pairs]), self.norm)
            yield x, torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return bce_dice_loss(model(x), y)

    def validate(self, model: nn.Module, epoch: int) -> tuple[float, dict[str, Any]]:
        metrics = validate(model, self.val, self.work, self.norm)
        logger.info("epoch %d val dice %.4f jaccard %.4f thr-jaccard %.4f", epoch + 1, metrics["dice"],
                    metrics["jaccard"], metrics["thresholded_jaccard"])
        return float(metrics["dice"]), {"val": metrics}

    def on_best(self, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> None:
        self.export(model, epoch, metrics)
