"""`cxr-cds dicom inspect` and `cxr-cds dicom render` (through their own register())."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cds_service.imaging.cli import register
from cds_service.imaging.files import read_image_file
from cds_service.imaging.preprocess import resize_and_crop
from tests.imaging.conftest import seed_file

RG1 = seed_file("nema-rg1-cr-chest-pa-j2k-lossy.dcm")
DOG = seed_file("dog-lateral-thorax-dx.dcm")


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_inspect_json_shows_tags_decision_and_notes(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("dicom", "inspect", str(DOG), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["decision"] == {
        "analysable": False,
        "reason": "lateral view",
        "modality": "DX",
        "body_part": "THORAX",
        "view_position": "",
    }
    assert report["tags"]["PresentationLUTShape"] == "INVERSE"
    assert report["image"]["notes"] == ["window 128/256", "inverted (MONOCHROME1)"]
    assert "PatientName" not in json.dumps(report) and "Dog^" not in json.dumps(report)


def test_inspect_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("dicom", "inspect", str(RG1)) == 0
    out = capsys.readouterr().out
    assert "decision: analysable: frontal chest radiograph" in out
    assert "TransferSyntax: JPEG 2000 Image Compression" in out


def test_inspect_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(RG1.read_bytes()[:5000])
    assert run("dicom", "inspect", str(bad)) == 1
    assert "error: " in capsys.readouterr().out


def test_render_writes_the_model_view(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    full, crop = tmp_path / "full.png", tmp_path / "crop.png"
    assert run("dicom", "render", str(RG1), "-o", str(full)) == 0
    assert run("dicom", "render", str(RG1), "-o", str(crop), "--model-input") == 0
    expected = read_image_file(RG1).pixels
    assert np.array_equal(np.asarray(Image.open(full)), expected)
    assert np.array_equal(np.asarray(Image.open(crop)), resize_and_crop(expected))
    assert "wrote" in capsys.readouterr().out


def test_render_warns_when_the_service_would_not_analyse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("dicom", "render", str(DOG), "-o", str(tmp_path / "dog.png")) == 0
    assert "would not analyse this image: lateral view" in capsys.readouterr().out


def test_render_refuses_garbage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not an image")
    assert run("dicom", "render", str(junk), "-o", str(tmp_path / "x.png")) == 1
    assert "cannot render junk.dcm: not a DICOM" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
