"""End-to-end evaluation of the production analyser on any labelled folder of dermoscopy images.

:mod:`~dermnode.evaluation.segmentation` and :mod:`~dermnode.evaluation.classification` measure each network on
the layouts of the training data (ISIC 2017 with its official split, the isic-9class set with its cleaning rules,
classifier crops from the ground-truth masks). A set from another clinic and another dermoscope is judged the way
the service works instead: every image goes through :class:`~dermnode.inference.analyzer.Analyzer` (quality gate,
artefact removal, segmentation, measurements, classification on the crop of the *predicted* lesion), at its own
resolution, one image at a time (a folder of 6000-pixel images is never loaded at once).

Folder layout (the one of ``../shared/data/*``)
    ``images/<image_id>.<ext>``
        Photographs (JPEG, PNG, TIFF, BMP: anything Pillow reads) or DICOM files (``.dcm``; decoded as the
        service does, with their pixel spacing).
    ``masks/<image_id>.png`` or ``masks/<image_id>_segmentation.png`` (optional)
        Lesion ground truth (pixels >= 128 are lesion), any resolution: the prediction is compared at the
        mask's resolution.
    ``labels.csv`` (optional when there are masks)
        Column ``image_id`` (or ``image``, ``isic_id``); a spreadsheet's UTF-8 byte-order mark is ignored.
        Optional ``split``: rows of ``--split`` are kept (no such row: an error naming the splits found);
        every row is used without the column or with ``--split all`` (``split_evaluated`` in the metrics says
        which). Labels, each optional:

        * melanoma (0/1): ``melanoma``, else ``melanoma_isic2017``, else ``diagnosis == MEL``;
        * malignant (benign/malignant): ``benign_malignant``, else derived from ``diagnosis`` (MEL, BCC, SCC and
          AK count as malignant, as in the shared data's README);
        * diagnosis: ``diagnosis`` (or HAM10000's ``dx``, ``diagnosis_isic2019``, ``class_name``) with ISIC codes
          (``MEL``, ``NV``, ``BCC``, ``AK``/``AKIEC``, ``BKL``, ``DF``, ``SK``, ``SCC``, ``VASC``;
          case-insensitive; HAM10000's ``akiec`` maps to ``AK``) or the ISIC Archive's names ("melanoma",
          "seborrheic keratosis", ...).
        Masks may be 0/255 or 0/1 PNGs; ``image_id`` may include the file extension.

Metrics (``pipeline_metrics.json``)
    * ``coverage``: images analysed, images refused (``not_analysable``) with their reasons, unreadable files,
      and ``errors`` (an unexpected failure of one image is logged with its traceback and counted, the run goes
      on; a mask that cannot be read leaves that image out of the segmentation scores).
    * ``segmentation`` (with masks): Dice, Jaccard, thresholded Jaccard (ISIC 2018 rule), pixel accuracy,
      sensitivity, specificity, averaged per image, twice: over every image (a refused image counts as an empty
      prediction, i.e. Dice 0 unless its mask is empty) and over the analysed ones only.
    * ``melanoma`` and ``malignant`` (with those labels, analysed images only): ROC AUC with a bootstrap 95 %
      interval, sensitivity at 80 % and 95 % specificity, balanced accuracy at 0.5, expected calibration error
      (10 bins), the confidence bands' share and positive rate. The melanoma score is the calibrated
      ``melanoma_probability``; the malignant score is the summed diagnosis probability of MEL, BCC, SCC and AK.
    * ``diagnosis`` (with diagnosis labels): accuracy, balanced accuracy, per-class recall and support,
      confusion matrix, top-class calibration error.

Per image (``per_image.csv``): status, reason, the scores, Dice/Jaccard when a mask exists, analysis time.
Figures: ``roc.png``, ``confusion_matrix.png``, ``dice_histogram.png`` where the data allow.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from dermnode.errors import DecodeError, PipelineError
from dermnode.evaluation.classification import binary_metrics, plot_confusion, plot_roc
from dermnode.evaluation.classification_metrics import (
    balanced_accuracy,
    confusion_matrix,
    expected_calibration_error,
    roc_curve,
)
from dermnode.evaluation.segmentation import save_segmentation_figures
from dermnode.evaluation.segmentation_metrics import SegmentationScores, mean_scores, score_masks
from dermnode.inference.analyzer import Analyzer
from dermnode.inference.imaging import logit, sigmoid
from dermnode.settings import AnalysisSettings
from dermnode.vocabulary import DIAGNOSIS_CLASSES, MALIGNANT_CLASSES, AnalysisResult, AnalysisStatus, SourceImage

logger = logging.getLogger(__name__)

#: Image file extensions tried, in this order, for ``images/<image_id>``.
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".dcm")
#: Diagnoses counted as malignant (AK as pre-malignant), as in the shared data's README.
MALIGNANT_CODES: frozenset[str] = MALIGNANT_CLASSES
_DIAGNOSIS_ALIASES: dict[str, str] = {
    "AKIEC": "AK",
    "NEV": "NV",
    "SEK": "SK",
    # the ISIC Archive's diagnosis names (as in isic-9class's class_name column)
    "ACTINIC KERATOSIS": "AK",
    "BASAL CELL CARCINOMA": "BCC",
    "DERMATOFIBROMA": "DF",
    "MELANOMA": "MEL",
    "NEVUS": "NV",
    "NAEVUS": "NV",
    "MELANOCYTIC NEVUS": "NV",
    "PIGMENTED BENIGN KERATOSIS": "BKL",
    "BENIGN KERATOSIS": "BKL",
    "BENIGN KERATOSIS-LIKE LESION": "BKL",
    "SEBORRHEIC KERATOSIS": "SK",
    "SQUAMOUS CELL CARCINOMA": "SCC",
    "VASCULAR LESION": "VASC",
}


@dataclass(frozen=True)
class LabelledImage:
    """One row of the folder: where its files are and what its labels say (``None`` when unknown)."""

    image_id: str
    image_path: Path | None
    mask_path: Path | None
    melanoma: int | None
    malignant: int | None
    diagnosis: str | None


def normalise_diagnosis(value: str) -> str | None:
    """Map a diagnosis label to one of :data:`DIAGNOSIS_CLASSES` (``None`` when it is none of them).

    Parameters
    ----------
    value:
        A label such as ``"MEL"``, ``"mel"``, ``"akiec"`` or ``"nv"``.

    Returns
    -------
    str or None
        The ISIC class code.
    """
    code = " ".join(value.replace("_", " ").split()).upper()
    code = _DIAGNOSIS_ALIASES.get(code, code)
    return code if code in DIAGNOSIS_CLASSES else None


def _binary(value: str | None) -> int | None:
    if value is None or value.strip() == "":
        return None
    v = value.strip().lower()
    if v in ("1", "1.0", "true", "yes", "malignant"):
        return 1
    if v in ("0", "0.0", "false", "no", "benign"):
        return 0
    return None


def _find_file(folder: Path, stems: tuple[str, ...], extensions: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for ext in extensions:
            for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


#: Column names read for each field, in order (HAM10000's metadata says ``dx``, ISIC 2017 ``diagnosis_isic2019``).
_ID_COLUMNS = ("image_id", "image", "isic_id")
_DIAGNOSIS_COLUMNS = ("diagnosis", "dx", "diagnosis_isic2019", "class_name")
_MELANOMA_COLUMNS = ("melanoma", "melanoma_isic2017")


def _first(row: dict[str, str], columns: tuple[str, ...]) -> str | None:
    for column in columns:
        value = (row.get(column) or "").strip()
        if value:
            return value
    return None


def _select_split(rows: list[dict[str, str]], split: str, labels: Path) -> tuple[list[dict[str, str]], str]:
    """The rows of ``split`` and what was selected: ``split``, or ``"all"`` when every row is kept.

    Every row is kept for ``split == "all"`` and when there is no ``split`` column. When the column exists but
    no row has the requested split, that is an error naming the splits found: evaluating every row instead would
    silently score training images (isic-9class has only ``train`` and ``test``) or a typo's worth of data.

    Raises
    ------
    PipelineError
        When ``labels.csv`` has a ``split`` column and no row of ``split``.
    """
    if split == "all" or not rows:
        return rows, "all"
    if "split" not in rows[0]:
        logger.info("%s has no split column: evaluating all %d rows", labels, len(rows))
        return rows, "all"
    wanted = split.strip().casefold()
    chosen = [r for r in rows if (r.get("split") or "").strip().casefold() == wanted]
    if chosen:
        return chosen, split.strip()
    found = sorted({(r.get("split") or "").strip() or "(empty)" for r in rows})
    raise PipelineError(
        f"{labels} has no row of split {split!r} (splits found: {', '.join(found)}); choose one with --split, "
        "or --split all to evaluate every row"
    )


def read_labelled_folder(data_dir: Path, split: str) -> tuple[list[LabelledImage], str]:
    """List the images of ``data_dir`` (and of ``split`` when ``labels.csv`` has a ``split`` column).

    ``labels.csv`` may be written by a spreadsheet (a UTF-8 byte-order mark is ignored); the image id is read
    from ``image_id`` (or ``image``, ``isic_id``; with or without the file's extension), the diagnosis from
    ``diagnosis`` (or ``dx``, ``diagnosis_isic2019``, ``class_name``; ISIC codes or the ISIC Archive's names such
    as "seborrheic keratosis"), melanoma from ``melanoma`` (or ``melanoma_isic2017``), malignancy from
    ``benign_malignant``; labels that are absent are derived from the diagnosis where possible, and a benign
    lesion counts as not melanoma. Diagnoses that are no ISIC class are logged.

    Parameters
    ----------
    data_dir:
        The folder (see the module docstring).
    split:
        Value of the ``split`` column to keep; ``"all"`` keeps every row, as does a folder whose
        ``labels.csv`` has no ``split`` column (see :func:`_select_split`).

    Returns
    -------
    list of LabelledImage, str
        One entry per row (or per image file when there is no ``labels.csv``), and the split actually
        evaluated (``split`` or ``"all"``).

    Raises
    ------
    PipelineError
        When the folder has no ``images/`` folder, the requested split has no row, or the selection is empty.
    """
    images_dir, masks_dir = data_dir / "images", data_dir / "masks"
    if not images_dir.is_dir():
        raise PipelineError(f"{data_dir} has no images/ folder")
    labels = data_dir / "labels.csv"
    rows: list[dict[str, str]]
    if labels.is_file():
        with labels.open(newline="", encoding="utf-8-sig") as fh:
            rows = [{(k or "").strip(): v for k, v in r.items()} for r in csv.DictReader(fh)]
        rows, selected = _select_split(rows, split, labels)
    else:
        rows = [{"image_id": p.stem} for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
        selected = "all"
        logger.info("%s has no labels.csv: evaluating the %d image files", data_dir, len(rows))
    out: list[LabelledImage] = []
    unmapped: dict[str, int] = {}
    for r in rows:
        image_id = _first(r, _ID_COLUMNS)
        if not image_id:
            continue
        stem = Path(image_id).stem if Path(image_id).suffix.lower() in IMAGE_EXTENSIONS else image_id
        label = _first(r, _DIAGNOSIS_COLUMNS)
        diagnosis = normalise_diagnosis(label) if label else None
        if label and diagnosis is None:
            unmapped[label] = unmapped.get(label, 0) + 1
        melanoma = _binary(_first(r, _MELANOMA_COLUMNS))
        if melanoma is None and diagnosis is not None:
            melanoma = int(diagnosis == "MEL")
        malignant = _binary(r.get("benign_malignant"))
        if malignant is None and diagnosis is not None:
            malignant = int(diagnosis in MALIGNANT_CODES)
        if melanoma is None and malignant == 0:
            melanoma = 0  # a benign lesion is not a melanoma, whatever its (unmapped) diagnosis
        mask = None
        if masks_dir.is_dir():
            mask = _find_file(masks_dir, (stem, f"{stem}_segmentation"), (".png",))
        image_path = _find_file(images_dir, (stem,), IMAGE_EXTENSIONS)
        if image_path is None and (images_dir / image_id).is_file():
            image_path = images_dir / image_id  # the id is the file name, with an extension not listed
        out.append(
            LabelledImage(
                image_id=image_id,
                image_path=image_path,
                mask_path=mask,
                melanoma=melanoma,
                malignant=malignant,
                diagnosis=diagnosis,
            )
        )
    if unmapped:
        logger.warning("%s: diagnoses that are not ISIC classes (no diagnosis label for these rows): %s",
                       labels, ", ".join(f"{k!r} x{v}" for k, v in sorted(unmapped.items())))
    if not out:
        raise PipelineError(f"no images to evaluate in {data_dir} (split {split!r})")
    return out, selected


def load_source(path: Path, settings: AnalysisSettings, image_id: str) -> SourceImage:
    """Read one image file as the analyser's input (DICOM files as the service decodes them).

    Parameters
    ----------
    path:
        Photograph or DICOM file.
    settings:
        ``[analysis]`` settings (device calibrations for DICOM files).
    image_id:
        Used as the identifiers of a photograph (nothing is written as DICOM here).

    Returns
    -------
    SourceImage
        The RGB pixels, with the DICOM pixel spacing when there is one.

    Raises
    ------
    DecodeError
        When the file cannot be read or decoded.
    """
    from dermnode.dicom_io.reading import read_dicom_file, to_source_image
    from dermnode.dicom_io.wrap import load_rgb

    ds = read_dicom_file(path)  # DICOM by content, as `dermnode analyze` decides it
    if ds is not None:
        return to_source_image(ds, settings.calibrations)

    return SourceImage(
        rgb=load_rgb(path),
        sop_instance_uid=image_id,
        sop_class_uid="",
        study_instance_uid="",
        series_instance_uid="",
        spacing=None,
    )


def _read_mask(path: Path) -> npt.NDArray[np.bool_]:
    """A ground-truth mask: 0/255 masks are cut at 128, 0/1 masks (maximum 1) at 0.

    Raises
    ------
    DecodeError
        When the file cannot be read as an image.
    """
    gt = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if gt is None:
        raise DecodeError(f"cannot read mask {path}")
    return np.asarray(gt > 0 if gt.max() <= 1 else gt >= 128, dtype=bool)


def _predicted_mask(result: AnalysisResult | None, shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    if result is None or result.mask is None:
        return np.zeros(shape, dtype=bool)
    mask = result.mask
    if mask.shape != shape:
        (h, w), (gh, gw) = mask.shape, shape
        if abs((w / h) / (gw / gh) - 1.0) > 0.01:
            logger.warning("%s: the mask (%dx%d) and the image (%dx%d) differ in aspect ratio; the prediction is "
                           "stretched to the mask (a rotated photograph?)", result.source.sop_instance_uid,
                           gw, gh, w, h)
        resized = cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        mask = np.asarray(resized > 0, dtype=bool)
    return mask


def _diagnosis_metrics(truth: list[str], probs: list[dict[str, float]], out_dir: Path) -> dict[str, Any]:
    classes = list(DIAGNOSIS_CLASSES)
    y = np.array([classes.index(t) for t in truth], dtype=np.int64)
    pd = np.array([[pr.get(c, 0.0) for c in classes] for pr in probs], dtype=np.float64)
    pred = pd.argmax(axis=1)
    cm = confusion_matrix(y, pred, len(classes))
    plot_confusion(cm, DIAGNOSIS_CLASSES, out_dir / "confusion_matrix.png")
    return {
        "n": len(y),
        "classes": classes,
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "per_class_recall": {
            c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(classes)
        },
        "support": {c: int(cm[i].sum()) for i, c in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
        "ece_top_class": expected_calibration_error(y, pd),
    }


def evaluate_pipeline(
    data_dir: Path,
    split: str,
    settings: AnalysisSettings,
    out_dir: Path,
    *,
    limit: int | None = None,
    analyzer: Analyzer | None = None,
) -> dict[str, Any]:
    """Run the production analyser on every image of a labelled folder and measure it.

    Parameters
    ----------
    data_dir:
        The folder (see the module docstring).
    split:
        ``split`` value to keep (``"all"``: every row; ignored without a ``split`` column).
    settings:
        ``[analysis]`` settings, exactly as the service would use them (models folder, hair removal, bands).
    out_dir:
        Where ``pipeline_metrics.json``, ``per_image.csv`` and the figures are written (created if needed).
    limit:
        Evaluate only the first ``limit`` images.
    analyzer:
        An already loaded analyser (default: one built from ``settings``).

    Returns
    -------
    dict
        The document written to ``pipeline_metrics.json``.

    Raises
    ------
    PipelineError
        When the folder has no images, or nothing to measure (no masks and no labels).
    ModelError
        When the models cannot be loaded.
    """
    items, selected_split = read_labelled_folder(Path(data_dir), split)
    if limit is not None:
        items = items[:limit]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    analyzer = analyzer or Analyzer(settings)
    rows: list[dict[str, Any]] = []
    seg_all: list[SegmentationScores] = []
    seg_analysed: list[SegmentationScores] = []
    mel_y: list[int] = []
    mel_p: list[float] = []
    mal_y: list[int] = []
    mal_p: list[float] = []
    diag_truth: list[str] = []
    diag_probs: list[dict[str, float]] = []
    reasons: dict[str, int] = {}
    unreadable = 0
    failed = 0
    seconds: list[float] = []
    for item in items:
        row: dict[str, Any] = {"image_id": item.image_id}
        result: AnalysisResult | None = None
        try:
            if item.image_path is None:
                raise DecodeError(f"no image file for {item.image_id}")
            source = load_source(item.image_path, settings, item.image_id)
            t0 = time.perf_counter()
            result = analyzer.analyze(source)
            seconds.append(time.perf_counter() - t0)
            row["status"] = result.status.value
            row["reason"] = result.reason or ""
        except DecodeError as exc:
            logger.error("%s: %s", item.image_id, exc)
            unreadable += 1
            row["status"], row["reason"] = "unreadable", str(exc)
        except Exception as exc:  # one image must not end a run of thousands: recorded, counted, logged in full
            logger.exception("%s: analysis failed", item.image_id)
            failed += 1
            row["status"], row["reason"] = "error", f"{type(exc).__name__}: {exc}"
        if result is not None and result.status is AnalysisStatus.NOT_ANALYSABLE:
            key = result.reason or "unspecified"
            reasons[key] = reasons.get(key, 0) + 1
        analysed = result is not None and result.status is AnalysisStatus.ANALYSED
        gt = None
        if item.mask_path is not None:
            try:
                gt = _read_mask(item.mask_path)
            except DecodeError as exc:
                logger.error("%s: %s (not scored for segmentation)", item.image_id, exc)
                row["mask_error"] = str(exc)
        if gt is not None:
            s = score_masks(_predicted_mask(result, gt.shape), gt)
            seg_all.append(s)
            if analysed:
                seg_analysed.append(s)
            row["dice"], row["jaccard"] = round(s.dice, 5), round(s.jaccard, 5)
        c = result.classification if result is not None else None
        if c is not None:
            p_malignant = float(sum(c.diagnosis_probabilities.get(k, 0.0) for k in MALIGNANT_CODES))
            row["melanoma_probability"] = round(c.melanoma_probability, 5)
            row["malignant_probability"] = round(p_malignant, 5)
            row["band"] = c.band.value
            row["top_diagnosis"] = max(c.diagnosis_probabilities, key=lambda k: c.diagnosis_probabilities[k])
            if item.melanoma is not None:
                mel_y.append(item.melanoma)
                mel_p.append(c.melanoma_probability)
            if item.malignant is not None:
                mal_y.append(item.malignant)
                mal_p.append(p_malignant)
            if item.diagnosis is not None:
                diag_truth.append(item.diagnosis)
                diag_probs.append(dict(c.diagnosis_probabilities))
        row.update(melanoma_label=item.melanoma, malignant_label=item.malignant, diagnosis_label=item.diagnosis)
        rows.append(row)

    n_analysed = sum(1 for r in rows if r.get("status") == AnalysisStatus.ANALYSED.value)
    doc: dict[str, Any] = {
        "data_dir": str(data_dir),
        "split": split,
        "split_evaluated": selected_split,  # "all" when labels.csv has no split column or no row of `split`
        "models": [m.to_json() for m in analyzer.models],
        "settings": {
            "hair_removal": settings.hair_removal,
            "clahe": settings.clahe,
            "band_calibration": analyzer.classifier.calibration.identity_text()
            if analyzer.classifier.calibration
            else "none",
            "band_benign_below": settings.band_benign_below,
            "band_malignant_above": settings.band_malignant_above,
        },
        "coverage": {
            "n_images": len(rows),
            "analysed": n_analysed,
            "not_analysable": sum(reasons.values()),
            "not_analysable_reasons": reasons,
            "unreadable": unreadable,
            "errors": failed,
        },
        "seconds_per_image_mean": float(np.mean(seconds)) if seconds else None,
    }
    if seg_all:
        doc["segmentation"] = {
            "all_images": {"n": len(seg_all), **mean_scores(seg_all).to_json()},
            "analysed_only": (
                {"n": len(seg_analysed), **mean_scores(seg_analysed).to_json()} if seg_analysed else None
            ),
            "fraction_jaccard_below_0_65": float(np.mean([s.jaccard < 0.65 for s in seg_all])),
        }
        save_segmentation_figures(out_dir, [{"dice": s.dice} for s in seg_all], [])
    curves: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float]] = {}
    calibration = analyzer.classifier.calibration
    for name, ys, ps in (("melanoma", mel_y, mel_p), ("malignant", mal_y, mal_p)):
        if len(set(ys)) == 2:
            doc[name] = binary_metrics(ys, ps, settings, calibration if name == "melanoma" else None)
            if name == "melanoma" and calibration is not None:
                # the same images without the band calibration: its temperature factor undone, fixed cut-offs
                raw = sigmoid(logit(ps, eps=1e-12) / calibration.temperature_factor)
                doc["melanoma_without_calibration"] = binary_metrics(ys, raw, settings)
            fpr, tpr, _ = roc_curve(ys, ps)
            curves[f"{name} vs rest"] = (fpr, tpr, doc[name]["auc"])
        elif ys:
            logger.warning("%s metrics skipped: the labels of the analysed images hold one class only", name)
    if curves:
        plot_roc(curves, out_dir / "roc.png")
    if diag_truth:
        doc["diagnosis"] = _diagnosis_metrics(diag_truth, diag_probs, out_dir)
    if not seg_all and not mel_y and not mal_y and not diag_truth:
        raise PipelineError(f"nothing to measure in {data_dir}: no masks and no labels of analysed images")
    _write_rows(out_dir / "per_image.csv", rows)
    (out_dir / "pipeline_metrics.json").write_text(json.dumps(doc, indent=2, default=float) + "\n", encoding="utf-8")
    logger.info(
        "pipeline on %s (%d images, %d analysed)%s%s",
        data_dir,
        len(rows),
        n_analysed,
        f": Dice {doc['segmentation']['all_images']['dice']:.4f}" if "segmentation" in doc else "",
        f", melanoma AUC {doc['melanoma']['auc']:.3f}" if "melanoma" in doc else "",
    )
    return doc


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
