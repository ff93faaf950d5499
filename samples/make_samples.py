"""Regenerate the showcase in samples/ from the shipped checkpoints.

    .venv/bin/python samples/make_samples.py [music] [image] [text]      (default: all three)

Validation material comes from ../shared/data (MAESTRO's validation split for music continuations, the
validation photos and books of the prepared data for images and text); nothing here was trained on.
Every sample's seed and settings are written next to it (index.json).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from perceiver_cli import runner
from perceiver_cli.render import image_grid

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
PREPARED = HERE.parent / "data"  # prepared shards (ignored by git); only the split lists are read


def music() -> None:
    out = HERE / "music"
    out.mkdir(exist_ok=True)
    loaded = runner.load(None, "music")
    records = []
    for seed in (1, 2, 3):
        path = out / f"piece_seed{seed}.mid"
        start = time.perf_counter()
        summary = runner.generate_file(
            loaded, runner.MusicRequest(seconds=60), runner.GenerateOptions(seed=seed), path, force=True
        )
        records.append(
            {
                "file": path.name,
                "seed": seed,
                "seconds_of_music": 60,
                "wall_s": time.perf_counter() - start,
                "tokens": summary.tokens,
                "settings": summary.settings,
            }
        )
    with open(SHARED / "midi" / "maestro" / "maestro-v3.0.0.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "validation"]
    available = [r for r in rows if (SHARED / "midi" / "maestro" / r["midi_filename"]).is_file()]
    for index, row in enumerate(available[:: max(1, len(available) // 3)][:3]):
        prompt = SHARED / "midi" / "maestro" / row["midi_filename"]
        path = out / f"continuation_{index + 1}.mid"
        request = runner.MusicRequest(seconds=40, prompt=prompt, prompt_seconds=20)
        summary = runner.generate_file(loaded, request, runner.GenerateOptions(seed=index), path, force=True)
        records.append(
            {
                "file": path.name,
                "seed": index,
                "prompt": f"{row['canonical_composer']}: {row['canonical_title']} (MAESTRO validation, first 20 s)",
                "tokens": summary.tokens,
                "settings": summary.settings,
            }
        )
    (out / "index.json").write_text(json.dumps(records, indent=1) + "\n")


def image() -> None:
    out = HERE / "image"
    out.mkdir(exist_ok=True)
    loaded = runner.load(None, "image")
    summary = runner.sample_batch(
        loaded,
        runner.ImageRequest(),
        runner.GenerateOptions(seed=0, batch_size=4),
        16,
        out / "unconditional",
        force=True,
    )
    manifest = json.loads((PREPARED / "image" / "manifest.json").read_text())
    val = [f["file"] for f in manifest["files"] if f["split"] == "val"]
    roots = {Path(p).name: Path(p) for p in manifest["inputs"]}
    larger = [v for v in val if "cifar10" not in v]  # 32x32 CIFAR originals say little about completion
    chosen = larger[:: max(1, len(larger) // 4)][:4]
    tiles, labels, records = [], [], []
    for index, name in enumerate(chosen):
        root, rest = name.split("/", 1)
        photo = roots[root] / rest
        original = Image.fromarray(loaded.codec.load_rgb(photo))
        kept = np.asarray(original).copy()
        kept[loaded.codec.height // 2 :] = 128
        tiles.append(Image.fromarray(kept))
        labels.append("kept half")
        # four completions in one batched run; the batch's generator is seeded with `seed`
        seed = 1000 * index
        request = runner.ImageRequest(prompt=photo, keep_fraction=0.5)
        generation = runner.generate_image(loaded, request, runner.GenerateOptions(seed=seed, batch_size=4))
        for position, sample in enumerate(generation.samples):
            tiles.append(sample.image)
            labels.append(f"seed {seed} #{position}")
        tiles.append(original)
        labels.append("original")
        records.append({"photo": name, "keep": 0.5, "batch_seed": seed, "batch_size": 4})
    image_grid(tiles, out / "completions.png", columns=6, scale=4, labels=labels)
    (out / "completions.json").write_text(
        json.dumps({"rows": records, "settings": summary.settings}, indent=1) + "\n"
    )


def text() -> None:
    out = HERE / "text"
    out.mkdir(exist_ok=True)
    loaded = runner.load(None, "text")
    manifest = json.loads((PREPARED / "text" / "manifest.json").read_text())
    roots = {Path(p).name: Path(p) for p in manifest["inputs"]}
    val = [f["file"] for f in manifest["files"] if f["split"] == "val"][:3]
    from perceiver_cli.train.prepare import clean_book

    records = []
    for index, name in enumerate(val):
        root, rest = name.split("/", 1)
        book = clean_book(roots[root] / rest)
        middle = len(book) // 2
        prompt = book[middle - 6000 : middle]
        prompt = prompt[prompt.index("\n\n") + 2 :] if "\n\n" in prompt else prompt
        prompt_file = out / f"prompt_{index + 1}.txt"
        prompt_file.write_text(prompt)
        for seed in (1, 2):
            path = out / f"continuation_{index + 1}_seed{seed}.txt"
            request = runner.TextRequest(tokens=500, prompt_file=prompt_file)
            generation = runner.generate_text(loaded, request, runner.GenerateOptions(seed=seed, top_p=0.95))
            path.write_text(generation.samples[0].continuation)  # the prompt is prompt_N.txt beside it
            records.append(
                {
                    "book": name,
                    "prompt": prompt_file.name,
                    "file": path.name,
                    "seed": seed,
                    "top_p": 0.95,
                    "tokens": 500,
                }
            )
    (out / "index.json").write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    for name in sys.argv[1:] or ["music", "image", "text"]:
        {"music": music, "image": image, "text": text}[name]()
