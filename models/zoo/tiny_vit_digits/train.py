"""Train the built-in ``tiny-vit-digits`` model: a small ViT on scikit-learn's digits.

The data is ``sklearn.datasets.load_digits()``: 1797 real 8x8 grayscale images of handwritten
digits (10 classes, pixel values 0..16), bundled with scikit-learn, so nothing is downloaded.
The script is deterministic (fixed seeds, 2 CPU threads) and writes, next to itself:

- ``split.json``: the stratified train / test split (test = 20%), so other code evaluates on
  the same held-out images;
- ``preprocessor_config.json``: pixel / 16, then normalize with mean 0.5 and std 0.5;
- ``config.json`` and ``model.safetensors``: the trained ``ViTForImageClassification``;
- ``metrics.json``: held-out test accuracy, training seconds and parameter count.

It exits non-zero if the test accuracy is below ``MIN_ACCURACY``. Run from the repo root:

    python models/zoo/tiny_vit_digits/train.py
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional as F
from transformers import ViTConfig, ViTForImageClassification

OUT_DIR = Path(__file__).resolve().parent
SEED = 0
TEST_SIZE = 0.2
EPOCHS = 40
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
SHIFT_PROBABILITY = 0.5
MIN_ACCURACY = 0.95

SCALE = 1.0 / 16.0  # raw pixels are 0..16
MEAN = 0.5
STD = 0.5
PREPROCESSOR = {
    "image_size": [8, 8],
    "num_channels": 1,
    "scale": SCALE,
    "mean": [MEAN],
    "std": [STD],
}


def seed_everything(seed: int) -> None:
    """Fix every random source and pin torch to 2 deterministic CPU threads."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


def build_config() -> ViTConfig:
    """The tiny ViT: 8x8 one-channel input, 2x2 patches (16 tokens + CLS), 4 layers of width 64."""
    return ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},  # 10 labels: num_labels follows id2label
    )


def preprocess(raw: torch.Tensor) -> torch.Tensor:
    """Raw 0..16 pixels of shape (N, 8, 8) or (N, 1, 8, 8) -> normalized (N, 1, 8, 8) floats."""
    pixels = raw.reshape(-1, 1, 8, 8).float() * SCALE
    return (pixels - MEAN) / STD


def random_shift(raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift raw (N, 1, 8, 8) images by -1..1 pixels in x and y, filling with background 0.

    Only a ``SHIFT_PROBABILITY`` share of the images is shifted: the digits fill most of the 8x8
    frame, so shifting every image drops too many edge pixels and slows training down.
    """
    n = raw.shape[0]
    keep = torch.rand(n, generator=generator) >= SHIFT_PROBABILITY
    padded = F.pad(raw, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (n,), generator=generator)
    dx = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, None, :, None].expand(n, 1, 8, 10)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(8))[:, None, None, :].expand(n, 1, 8, 8)
    shifted = cropped.gather(3, cols)
    return torch.where(keep[:, None, None, None], raw, shifted)


def split_indices(labels: np.ndarray) -> tuple[list[int], list[int]]:
    """Stratified train / test indices into ``load_digits()``, both sorted."""
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_SIZE, stratify=labels, random_state=SEED
    )
    return sorted(int(i) for i in train_idx), sorted(int(i) for i in test_idx)


@torch.no_grad()
def accuracy(model: ViTForImageClassification, raw: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on raw 0..16 images."""
    model.eval()
    logits = model(pixel_values=preprocess(raw)).logits
    return float((logits.argmax(-1) == labels).float().mean())


def train(
    model: ViTForImageClassification, raw: torch.Tensor, labels: torch.Tensor
) -> ViTForImageClassification:
    """AdamW with linear warm-up and cosine decay, random 1-pixel shifts as augmentation."""
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(labels) // BATCH_SIZE)
    total = EPOCHS * steps_per_epoch
    warmup = steps_per_epoch * 2
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / warmup, 0.5 * (1 + np.cos(np.pi * min(s / total, 1.0)))),
    )
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        loss_sum = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            pixels = preprocess(random_shift(raw[batch], generator))
            loss = F.cross_entropy(model(pixel_values=pixels).logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(batch)
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  train loss {loss_sum / len(labels):.4f}")
    return model


def main() -> int:
    """Split, train, evaluate and save; 0 if the test accuracy is high enough, else 1."""
    seed_everything(SEED)
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32)).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train_idx, test_idx = split_indices(digits.target)
    (OUT_DIR / "split.json").write_text(
        json.dumps({"seed": SEED, "test_indices": test_idx, "train_indices": train_idx}) + "\n"
    )
    (OUT_DIR / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")

    model = ViTForImageClassification(build_config())
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{parameters} parameters, {len(train_idx)} train / {len(test_idx)} test images")

    started = time.perf_counter()
    train(model, images[train_idx], labels[train_idx])
    train_seconds = time.perf_counter() - started
    test_accuracy = accuracy(model, images[test_idx], labels[test_idx])
    print(f"test accuracy {test_accuracy:.4f} after {train_seconds:.1f} s")

    # transformers 5 always writes safetensors (``safe_serialization`` is gone): no pickle.
    model.save_pretrained(OUT_DIR)
    (OUT_DIR / "model.safetensors").chmod(0o644)  # written 0600; package data must be readable
    metrics = {
        "test_accuracy": round(test_accuracy, 6),
        "train_seconds": round(train_seconds, 2),
        "parameters": parameters,
    }
    (OUT_DIR / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if test_accuracy < MIN_ACCURACY:
        print(f"test accuracy {test_accuracy:.4f} < {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
