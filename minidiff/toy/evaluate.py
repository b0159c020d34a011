"""Read a picture of the toy world: which shape, which colour, which background.

A plain measurement of the pixels, no learned model, so that it cannot share a blind spot with
the generator it grades:
  1. background = the palette colour nearest the median of the image border;
  2. the shape's pixels = those far from that background colour; keep the largest connected blob;
  3. colour = the palette colour (other than the background's) nearest the median of the blob's
     most saturated pixels (the blurred rim is left out);
  4. shape = the outline that, drawn into the blob's bounding box, overlaps the blob best (soft IoU).

`self_check` runs it on freshly drawn held-out images, where the answer is known.

    python -m minidiff.toy.evaluate          # prints the self-check accuracies
"""
import argparse
import dataclasses

import numpy as np

from . import shapes

PALETTE = np.array(list(shapes.COLOURS.values()), np.float32)
NAMES = list(shapes.COLOURS)
MIN_CONTRAST = 40.0  # RGB distance below which a pixel counts as background


@dataclasses.dataclass
class Reading:
    shape: str | None  # None: no shape found
    colour: str | None
    background: str
    iou: float  # overlap of the blob with the chosen outline: how shape-like the blob is


def nearest_colour(rgb, exclude=None):
    d = np.linalg.norm(PALETTE - np.asarray(rgb, np.float32)[None], axis=1)
    if exclude is not None:
        d[NAMES.index(exclude)] = np.inf
    return NAMES[int(d.argmin())]


def largest_blob(mask):
    """The largest 4-connected region of a boolean mask (flood fill; a 64x64 image takes a millisecond)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, region = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for v, u in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    stack.append((v, u))
        if len(region) > len(best):
            best = region
    blob = np.zeros_like(mask)
    if best:
        blob[tuple(np.array(best).T)] = True
    return blob


def dilate(mask):
    """The mask grown by one pixel in the four directions."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def read(image):
    """Reading of one (H, W, 3) uint8 image (or float in [0, 255])."""
    img = np.asarray(image, np.float32)
    h, w, _ = img.shape
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = nearest_colour(bg_rgb)
    dist = np.linalg.norm(img - bg_rgb, axis=-1)
    mask = dist > max(MIN_CONTRAST, 0.4 * dist.max())
    if not mask.any():
        return Reading(None, None, background, 0.0)
    blob = largest_blob(mask)

    core = blob & (dist >= np.percentile(dist[blob], 50))
    fg_rgb = np.median(img[core], axis=0)
    colour = nearest_colour(fg_rgb, exclude=background)

    # soft coverage of each pixel by the shape, from how far it moved from the background toward fg
    contrast = max(float(np.linalg.norm(fg_rgb - bg_rgb)), 1.0)
    alpha = np.clip(np.sum((img - bg_rgb) * (fg_rgb - bg_rgb), -1) / contrast**2, 0, 1)
    alpha = np.where(dilate(blob), alpha, 0.0)
    ys, xs = np.nonzero(alpha > 0.5)
    box = (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
    best, best_iou = None, -1.0
    for name in shapes.SHAPES:
        t = shapes.coverage(name, box, resolution=h)
        iou = float(np.minimum(alpha, t).sum() / max(np.maximum(alpha, t).sum(), 1e-6))
        if iou > best_iou:
            best, best_iou = name, iou
    return Reading(best, colour, background, best_iou)


def score(images, scenes):
    """Fractions right: {"colour", "shape", "background", "both"} over a list of images and their true scenes."""
    right = {"colour": 0, "shape": 0, "background": 0, "both": 0}
    for image, scene in zip(images, scenes):
        r = read(image)
        right["colour"] += r.colour == scene.colour
        right["shape"] += r.shape == scene.shape
        right["background"] += r.background == scene.background
        right["both"] += (r.colour == scene.colour) and (r.shape == scene.shape)
    return {k: v / max(len(scenes), 1) for k, v in right.items()}


def self_check(n=1000, seed=12345):
    """Accuracy on n freshly drawn images from a seed the training data never uses."""
    images, _, scenes = shapes.dataset(n, seed)
    return score(images, scenes)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=12345)
    a = p.parse_args()
    acc = self_check(a.n, a.seed)
    print(f"evaluator on {a.n} held-out drawn images: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))


if __name__ == "__main__":
    main()
