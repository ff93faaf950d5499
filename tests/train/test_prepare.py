"""perceiver prepare: shards, manifest, deterministic split by file, MAESTRO's own split, skipped files."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from perceiver_cli.train.prepare import PreparedData, PrepareOptions, prepare

from .conftest import write_scale_midi


def test_shards_manifest_and_skipped_files(music_data):
    data = PreparedData(music_data)
    manifest = json.loads((music_data / "manifest.json").read_text())
    assert manifest["counts"]["skipped"] == 1 and "broken.mid" in manifest["skipped"][0]["file"]
    assert data.tokens("train").dtype == np.uint16
    train_files = {f["file"] for f in manifest["files"] if f["split"] == "train"}
    val_files = {f["file"] for f in manifest["files"] if f["split"] == "val"}
    assert train_files and val_files and not train_files & val_files
    for split in ("train", "val"):
        documents = data.documents(split)
        assert all(d[0] == data.codec.bos_id and d[-1] == data.codec.eos_id for d in documents)
        assert sum(len(d) for d in documents) == manifest["counts"]["tokens"][split]


def test_split_is_deterministic(tmp_path, music_data):
    again = tmp_path / "again"
    source = json.loads((music_data / "manifest.json").read_text())["inputs"]
    prepare("music", [__import__("pathlib").Path(p) for p in source], again, PrepareOptions(val_fraction=0.25))
    first = json.loads((music_data / "manifest.json").read_text())["files"]
    second = json.loads((again / "manifest.json").read_text())["files"]
    assert first == second
    assert (again / "train.bin").read_bytes() == (music_data / "train.bin").read_bytes()


def test_maestro_csv_split_wins_and_test_split_is_left_out(tmp_path):
    root = tmp_path / "maestro"
    (root / "2004").mkdir(parents=True)
    rows = []
    for i, split in enumerate(["train", "train", "validation", "test"]):
        name = f"2004/piece{i}.midi"
        write_scale_midi(root / name, offset=i)
        rows.append({"midi_filename": name, "split": split})
    with open(root / "maestro-v3.0.0.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["midi_filename", "split"])
        writer.writeheader()
        writer.writerows(rows)
    report = prepare("music", [root], tmp_path / "out", PrepareOptions(val_fraction=0.0))
    assert report.files == {"train": 2, "val": 1}
    assert report.held_out == 1


def test_images_get_several_flipped_crops_in_train_and_one_in_val(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / f"p{i}.png")
    (root / "README.md").write_text("not a photo")
    report = prepare(
        "image", [root], tmp_path / "out", PrepareOptions(val_fraction=0.4, image_size=8, crops_per_image=3)
    )
    assert report.documents["train"] == report.files["train"] * 3 * 2
    assert report.documents["val"] == report.files["val"]
    data = PreparedData(tmp_path / "out")
    assert data.manifest["document_windows"] is True
    assert {len(d) for d in data.documents("train")} == {1 + 8 * 8 * 3}


def test_text_strips_gutenberg_and_trains_tokenizer_on_train_split(tmp_path):
    root = tmp_path / "books"
    root.mkdir()
    body = "It was a dark and stormy night; the rain fell in torrents. " * 40
    for i in range(8):
        text = f"Header junk\r\n*** START OF THE PROJECT GUTENBERG EBOOK BOOK {i} ***\r\n{body}{i}\r\n*** END OF THE PROJECT GUTENBERG EBOOK ***\r\nlicence"
        (root / f"book{i}.txt").write_text(text)
    report = prepare("text", [root], tmp_path / "out", PrepareOptions(val_fraction=0.3), tokenizer_vocab=282)
    assert report.files["train"] + report.files["val"] == 8
    data = PreparedData(tmp_path / "out")
    decoded = data.codec.decode(data.documents("train")[0])
    assert "START OF" not in decoded and "licence" not in decoded and "\r" not in decoded
    assert decoded.startswith("It was a dark")


def test_text_without_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="text needs a tokenizer"):
        prepare("text", [tmp_path], tmp_path / "out")


def test_missing_input_and_unknown_modality(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare("music", [tmp_path / "nope"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no music files"):
        prepare("music", [tmp_path], tmp_path / "out")
    with pytest.raises(ValueError, match="unknown modality"):
        prepare("audio", [tmp_path], tmp_path / "out")
