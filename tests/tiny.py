"""The tiny generated dataset of the end-to-end tests: smooth normal images, obvious square lesions."""
from pathlib import Path

import numpy as np
from PIL import Image

TINY = """
[geometry]
height = 128
width = 96
patch = 32
step = 16
[train]
epochs = 1
batch_size = 8
windows_per_image = 2
workers = 0
"""


def normal_image(rng):
    y, x = np.mgrid[:128, :96]
    smooth = 0.35 + 0.1 * np.sin(y / 9.0 + rng.random() * 6) * np.cos(x / 11.0)
    return np.clip(smooth + 0.02 * rng.normal(size=smooth.shape), 0, 1)


def make_tiny_data(root: Path) -> Path:
    """6 train, 4 val, 8 test images (half of val and test with a lesion and its mask), a manifest and tiny.toml."""
    rng = np.random.default_rng(0)
    rows = ["path,label,split,mask"]
    for split, count in (("train", 6), ("val", 4), ("test", 8)):
        for i in range(count):
            image = normal_image(rng)
            label = int(split != "train" and i % 2 == 1)
            mask_name = ""
            if label:
                y, x = rng.integers(8, 128 - 24), rng.integers(8, 96 - 24)
                image[y:y + 14, x:x + 14] = 1.0
                mask = np.zeros(image.shape, np.uint8)
                mask[y:y + 14, x:x + 14] = 255
                mask_name = f"{split}-{i}_mask.png"
                Image.fromarray(mask).save(root / mask_name)
            Image.fromarray((image * 65535).astype(np.uint16)).save(root / f"{split}-{i}.png")
            rows.append(f"{split}-{i}.png,{label},{split},{mask_name}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "tiny.toml").write_text(TINY)
    return root
