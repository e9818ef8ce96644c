"""ModelManifest: round trip, atomic write, hashes, and refusal of modified/missing/escaping files."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest

from core.errors import InputError, IntegrityError
from core.manifest import (
    HeadInfo,
    ModelManifest,
    VariantInfo,
    hash_files,
    sha256_file,
    verify_files,
    write_manifest,
)


def make_manifest(files: dict[str, str], **overrides) -> ModelManifest:
    fields = dict(
        name="pdl1",
        version="v1",
        training_run_id="run-1",
        source_run="/runs/1",
        preprocess={"size": 32, "n_slices": 2},
        input_shape=["N", 2, 3, 32, 32],
        outputs={"probability": ["N"]},
        feature_names=["a", "b"],
        feature_indices=[3, 7],
        threshold=0.4,
        head=HeadInfo(model_name="lr", classifier="LogisticRegression", type="linear"),
        has_graph_cam=False,
        files=files,
        variants={
            "fp32": VariantInfo(file="model.fp32.onnx", published=True, precision="float32", target="CPU")
        },
        intended_use="tests",
        limitations=["none"],
        synthetic_data=True,
    )
    fields.update(overrides)
    return ModelManifest(**fields)


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = b"x" * (3 << 20) + b"tail"  # several read chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_write_then_read_round_trips_and_is_world_readable(tmp_path: Path) -> None:
    (tmp_path / "model.fp32.onnx").write_bytes(b"graph")
    m = make_manifest(hash_files(tmp_path, ["model.fp32.onnx"]))
    path = write_manifest(m, tmp_path)
    assert path == tmp_path / "manifest.json"
    assert ModelManifest.read(path) == m
    assert path.stat().st_mode & stat.S_IROTH
    assert not list(tmp_path.glob(".manifest.json.*"))  # no temp file left behind
    assert m.published_variants == ["fp32"]


def test_verify_files_accepts_intact_and_names_the_modified_file(tmp_path: Path) -> None:
    for name in ("a.onnx", "b.pt"):
        (tmp_path / name).write_bytes(name.encode())
    files = hash_files(tmp_path, ["a.onnx", "b.pt"])
    verify_files(tmp_path, files)
    (tmp_path / "b.pt").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match=r"b\.pt: SHA-256 mismatch"):
        verify_files(tmp_path, files)
    verify_files(tmp_path, files, only=["a.onnx"])
    (tmp_path / "a.onnx").unlink()
    with pytest.raises(IntegrityError, match=r"a\.onnx: listed in the manifest but missing"):
        verify_files(tmp_path, files, only=["a.onnx"])


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", ""])
def test_verify_files_refuses_names_outside_the_export(tmp_path: Path, name: str) -> None:
    with pytest.raises(IntegrityError, match="relative paths inside"):
        verify_files(tmp_path, {name: "0" * 64})


def test_read_reports_file_and_field_of_a_bad_manifest(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    data = json.loads(make_manifest({}).model_dump_json())
    data["threshold"] = 2.0
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        ModelManifest.read(path)
    assert err.value.field == "threshold" and str(path) in str(err.value)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        ModelManifest.read(path)
    with pytest.raises(InputError, match="manifest not found"):
        ModelManifest.read(tmp_path / "nope.json")
