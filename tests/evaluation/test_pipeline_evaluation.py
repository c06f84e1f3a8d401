"""End-to-end evaluation of the production analyser on an arbitrary labelled folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from dermnode.errors import PipelineError
from dermnode.evaluation.classification import binary_metrics
from dermnode.evaluation.pipeline import (
    evaluate_pipeline,
    normalise_diagnosis,
    read_labelled_folder,
)
from dermnode.evaluation.runner import evaluate
from dermnode.inference.analyzer import Analyzer
from dermnode.settings import AnalysisSettings, Settings
from synthetic import synthetic_dermoscopy


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(AnalysisSettings())


def _ellipse_mask(h: int, w: int) -> np.ndarray:
    """The lesion that :func:`synthetic_dermoscopy` draws (semi-axes 0.22 h and 0.18 w, centred)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - h / 2) / (h * 0.22)) ** 2 + ((xx - w / 2) / (w * 0.18)) ** 2 <= 1.0


def _write_labels(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def clinic_folder(tmp_path: Path) -> Path:
    """A folder from 'another clinic': 4:3 photographs of two sizes, a blank frame, a missing file, no split."""
    root = tmp_path / "clinic"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for i, (h, w, diagnosis) in enumerate([(300, 400, "nv"), (450, 600, "MEL"), (300, 400, "akiec"), (450, 600, "NV")]):
        image_id = f"IMG_{i}"
        rgb = synthetic_dermoscopy(h, w, seed=i)
        cv2.imwrite(str(root / "images" / f"{image_id}.jpg"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        # ISIC-style mask name for one image, plain for the others; one mask at half resolution
        name = f"{image_id}_segmentation.png" if i == 1 else f"{image_id}.png"
        mask = _ellipse_mask(h, w).astype(np.uint8) * 255
        if i == 3:
            mask = cv2.resize(mask, (w // 2, h // 2), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(root / "masks" / name), mask)
        rows.append({"image_id": image_id, "diagnosis": diagnosis, "benign_malignant": ""})
    # a blank frame: the quality gate must refuse it (and it has no lesion)
    cv2.imwrite(str(root / "images" / "BLANK.png"), np.full((300, 400, 3), 128, np.uint8))
    cv2.imwrite(str(root / "masks" / "BLANK.png"), np.zeros((300, 400), np.uint8))
    rows.append({"image_id": "BLANK", "diagnosis": "NV", "benign_malignant": "benign"})
    rows.append({"image_id": "MISSING", "diagnosis": "NV", "benign_malignant": "benign"})
    _write_labels(root / "labels.csv", rows)
    return root


def test_diagnosis_labels_are_normalised() -> None:
    assert normalise_diagnosis("mel") == "MEL"
    assert normalise_diagnosis(" akiec ") == "AK"
    assert normalise_diagnosis("NV") == "NV"
    assert normalise_diagnosis("bkl") == "BKL"
    assert normalise_diagnosis("psoriasis") is None


def test_folder_labels_split_and_derived_labels(clinic_folder: Path) -> None:
    listed, selected = read_labelled_folder(clinic_folder, "val")  # no split column: every row
    assert selected == "all"
    items = {i.image_id: i for i in listed}
    assert set(items) == {"IMG_0", "IMG_1", "IMG_2", "IMG_3", "BLANK", "MISSING"}
    assert items["IMG_1"].melanoma == 1 and items["IMG_1"].malignant == 1
    assert items["IMG_1"].mask_path is not None and items["IMG_1"].mask_path.name == "IMG_1_segmentation.png"
    assert items["IMG_2"].diagnosis == "AK" and items["IMG_2"].malignant == 1 and items["IMG_2"].melanoma == 0
    assert items["IMG_0"].malignant == 0
    assert items["MISSING"].image_path is None

    labels = clinic_folder / "labels.csv"
    _write_labels(labels, [{"image_id": "IMG_0", "split": "test"}, {"image_id": "IMG_1", "split": "val"}])
    listed, selected = read_labelled_folder(clinic_folder, "val")
    assert [i.image_id for i in listed] == ["IMG_1"] and selected == "val"
    assert len(read_labelled_folder(clinic_folder, "all")[0]) == 2
    # no row of the requested split: an error naming the splits (every row would include training images)
    with pytest.raises(PipelineError, match=r"no row of split 'train' \(splits found: test, val\)"):
        read_labelled_folder(clinic_folder, "train")
    assert [i.image_id for i in read_labelled_folder(clinic_folder, " VAL ")[0]] == ["IMG_1"]  # case, spaces
    _write_labels(labels, [{"image_id": "NOPE", "split": "val"}])
    assert read_labelled_folder(clinic_folder, "val")[0][0].image_path is None


def test_spreadsheet_labels_with_bom_and_ham10000_columns(clinic_folder: Path) -> None:
    """A labels.csv saved by a spreadsheet (BOM) with HAM10000's metadata columns (``dx``)."""
    text = "\ufeffimage_id,dx,dx_type\nIMG_0,nv,histo\nIMG_1,mel,histo\nIMG_2,akiec,histo\n"
    (clinic_folder / "labels.csv").write_text(text, encoding="utf-8")
    listed, _ = read_labelled_folder(clinic_folder, "val")
    items = {i.image_id: i for i in listed}
    assert set(items) == {"IMG_0", "IMG_1", "IMG_2"}
    assert (items["IMG_1"].diagnosis, items["IMG_1"].melanoma, items["IMG_1"].malignant) == ("MEL", 1, 1)
    assert (items["IMG_2"].diagnosis, items["IMG_2"].melanoma, items["IMG_2"].malignant) == ("AK", 0, 1)
    assert items["IMG_0"].image_path is not None


def test_pipeline_evaluation_runs_the_production_analyser(
    clinic_folder: Path, tmp_path: Path, analyzer: Analyzer
) -> None:
    out = tmp_path / "out"
    doc = evaluate_pipeline(clinic_folder, "val", AnalysisSettings(), out, analyzer=analyzer)

    cov = doc["coverage"]
    assert cov == {
        "n_images": 6,
        "analysed": 4,
        "not_analysable": 1,
        "not_analysable_reasons": cov["not_analysable_reasons"],
        "unreadable": 1,
        "errors": 0,
    }
    assert sum(cov["not_analysable_reasons"].values()) == 1
    # the drawn lesion is found at every resolution; the blank frame counts as an empty prediction
    seg = doc["segmentation"]
    assert seg["all_images"]["n"] == 5 and seg["analysed_only"]["n"] == 4
    assert seg["analysed_only"]["dice"] > 0.85
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    by_id = {r["image_id"]: r for r in rows}
    assert by_id["BLANK"]["status"] == "not_analysable" and by_id["MISSING"]["status"] == "unreadable"
    assert float(by_id["IMG_3"]["dice"]) > 0.85  # mask at half resolution: compared at the mask's size
    assert by_id["BLANK"]["dice"] == "1.0"  # empty truth, empty prediction
    for r in rows[:4]:
        assert 0.0 <= float(r["melanoma_probability"]) <= 1.0
        assert r["band"] in {"benign", "indeterminate", "malignant"}
    # labels of both classes among the analysed images: binary metrics and the diagnosis confusion matrix
    assert doc["melanoma"]["n"] == 4 and doc["melanoma"]["n_positive"] == 1
    assert doc["malignant"]["n_positive"] == 2
    assert doc["diagnosis"]["support"]["NV"] == 2 and sum(doc["diagnosis"]["support"].values()) == 4
    assert json.loads((out / "pipeline_metrics.json").read_text())["coverage"]["analysed"] == 4
    for png in ("roc.png", "confusion_matrix.png", "dice_histogram.png"):
        assert (out / png).stat().st_size > 0


def test_evaluate_uses_the_pipeline_for_a_folder_that_is_not_a_training_set(
    clinic_folder: Path, tmp_path: Path
) -> None:
    metrics = evaluate(clinic_folder, "val", Settings(), tmp_path / "out")
    assert set(metrics) == {"data", "split", "pipeline"}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["pipeline"]["coverage"]["n_images"] == 6


def test_a_folder_without_masks_or_labels_has_nothing_to_measure(tmp_path: Path, analyzer: Analyzer) -> None:
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), cv2.cvtColor(synthetic_dermoscopy(), cv2.COLOR_RGB2BGR))
    with pytest.raises(PipelineError, match="nothing to measure"):
        evaluate_pipeline(tmp_path, "all", AnalysisSettings(), tmp_path / "out", analyzer=analyzer)
    with pytest.raises(PipelineError, match="no images/ folder"):
        read_labelled_folder(tmp_path / "out", "all")


def test_binary_metrics_on_known_scores() -> None:
    m = binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], AnalysisSettings())
    assert m["auc"] == 1.0 and m["n_positive"] == 2
    assert m["bands"]["benign"]["n"] == 1 and m["bands"]["malignant"]["n"] == 1
    assert m["bands"]["indeterminate"]["positive_rate"] == 0.5
    reversed_scores = binary_metrics([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], AnalysisSettings())
    assert reversed_scores["auc"] == 0.0


def test_real_size_ham10000_sample_end_to_end(shared_data: Path, tmp_path: Path, analyzer: Analyzer) -> None:
    doc = evaluate_pipeline(shared_data / "ham10000-sample", "all", AnalysisSettings(), tmp_path, analyzer=analyzer)
    assert doc["coverage"]["n_images"] == 5
    assert doc["segmentation"]["all_images"]["n"] == 5
    assert doc["diagnosis"]["n"] == doc["coverage"]["analysed"]


def test_archive_names_extensions_and_benign_rows(clinic_folder: Path) -> None:
    """Diagnoses as words, ids with their extension, and a benign row with an unknown diagnosis."""
    _write_labels(clinic_folder / "labels.csv", [
        {"image_id": "IMG_0.jpg", "diagnosis": "Seborrheic keratosis", "benign_malignant": ""},
        {"image_id": "IMG_1", "diagnosis": "melanoma", "benign_malignant": "malignant"},
        {"image_id": "IMG_2", "diagnosis": "basal_cell_carcinoma", "benign_malignant": ""},
        {"image_id": "IMG_3", "diagnosis": "lentigo", "benign_malignant": "benign"},
    ])
    listed, _ = read_labelled_folder(clinic_folder, "all")
    items = {i.image_id: i for i in listed}
    assert items["IMG_0.jpg"].image_path is not None and items["IMG_0.jpg"].mask_path is not None
    assert (items["IMG_0.jpg"].diagnosis, items["IMG_0.jpg"].melanoma) == ("SK", 0)
    assert (items["IMG_2"].diagnosis, items["IMG_2"].malignant) == ("BCC", 1)
    assert items["IMG_1"].melanoma == 1
    assert (items["IMG_3"].diagnosis, items["IMG_3"].melanoma, items["IMG_3"].malignant) == (None, 0, 0)


def test_zero_one_masks_and_unreadable_masks_are_handled(
    clinic_folder: Path, tmp_path: Path, analyzer: Analyzer
) -> None:
    """0/1 masks (a common export) are lesion where 1; a mask that cannot be read does not end the run."""
    for name in ("IMG_0.png", "IMG_2.png"):
        path = clinic_folder / "masks" / name
        cv2.imwrite(str(path), (cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 0).astype(np.uint8))
    (clinic_folder / "masks" / "BLANK.png").write_bytes(b"not a png")
    metrics = evaluate_pipeline(clinic_folder, "val", AnalysisSettings(), tmp_path / "out", analyzer=analyzer)
    rows = {r["image_id"]: r for r in csv.DictReader((tmp_path / "out" / "per_image.csv").open())}
    assert float(rows["IMG_0"]["dice"]) > 0.8 and float(rows["IMG_2"]["dice"]) > 0.8
    assert "cannot read mask" in rows["BLANK"]["mask_error"]
    assert metrics["coverage"]["errors"] == 0
