"""ImageNet-like JPEGs for the input benchmark and tests, in ILSVRC folder layout:

    python -m benchmarks.imagenet_jpegs --out /tmp/imagenet-like --count 512

writes OUT/train/<class>/*.JPEG and OUT/validation/<class>/*.JPEG. The pixels are real photographs
(matplotlib's bundled sample photograph, grace_hopper.jpg, and where scikit-image is installed its
sample photographs), each image a random crop, mirror and rescale of one, saved at quality 90. The
sizes follow ImageNet's spread: most images 500 pixels on the long side at 4:3 or 3:4 (about
500x375), the rest from 200 to 1000 pixels a side. Nothing here is committed: the files are made
where they are used.
"""
import argparse
import os
from typing import List, Tuple

import numpy as np

QUALITY = 90


def photographs() -> List[np.ndarray]:
    """uint8 RGB photographs that ship with installed packages."""
    import matplotlib.cbook
    from PIL import Image
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as im:
        photos = [np.asarray(im.convert("RGB"))]
    try:
        import skimage.data
        photos += [getattr(skimage.data, n)() for n in ("astronaut", "coffee", "chelsea", "rocket")]
    except Exception:  # noqa: BLE001 - optional; grace_hopper alone is enough
        pass
    return [p for p in photos if p.ndim == 3 and p.shape[2] == 3]


def image_size(rng: np.random.Generator) -> Tuple[int, int]:
    """(width, height) spread like ImageNet's: ~70% 500x375 or 375x500 (give or take a few
    pixels), the rest uniform in [200, 1000] a side."""
    if rng.random() < 0.7:
        long, short = 500, int(rng.integers(330, 376))
        return (long, short) if rng.random() < 0.75 else (short, long)
    return int(rng.integers(200, 1001)), int(rng.integers(200, 1001))


def make_image(photo: np.ndarray, size: Tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random crop (at least half of each side) of `photo`, maybe mirrored, resized to `size`."""
    from PIL import Image
    h, w = photo.shape[:2]
    ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = photo[top:top + ch, left:left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.BICUBIC))


def write_folder(out: str, count: int, classes: int = 4, splits=("train", "validation"),
                 seed: int = 0) -> List[str]:
    """`count` JPEGs per split under out/<split>/<class>/; returns the paths written."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    photos = photographs()
    paths = []
    for split in splits:
        for i in range(count):
            label = i % classes
            directory = os.path.join(out, split, f"n{label:08d}")
            os.makedirs(directory, exist_ok=True)
            image = make_image(photos[i % len(photos)], image_size(rng), rng)
            path = os.path.join(directory, f"{split}_{i:06d}.JPEG")
            Image.fromarray(image).save(path, quality=QUALITY)
            paths.append(path)
    return paths


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write (ILSVRC layout)")
    p.add_argument("--count", type=int, default=512, help="images per split")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    paths = write_folder(a.out, a.count, a.classes, seed=a.seed)
    print(f"wrote {len(paths)} JPEGs under {a.out}")


if __name__ == "__main__":
    main()
