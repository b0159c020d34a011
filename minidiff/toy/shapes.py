"""The toy world the bundled model is trained on: one plain shape on a plain background, and its caption.

A scene is a shape (circle, square, triangle, star) in one of eight colours, on a background of
another colour, at one of three sizes and nine positions, with a little jitter. Images are drawn
anti-aliased (4x supersampled), so edges look like those of a real photo of a flat shape.
Everything is drawn from a seeded numpy Generator: the same seed gives the same data set.

The caption grammar is a handful of plain-English templates; the words it can produce are also
the tokenizer's vocabulary (see `caption_words`).
"""
import dataclasses
import re

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 64
SUPERSAMPLE = 4

# Well separated in RGB, so a blurred edge pixel never sits closer to a third colour than to its own.
COLOURS = {
    "red": (215, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 220, 50),
    "green": (50, 165, 70),
    "blue": (40, 90, 215),
    "purple": (135, 60, 180),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
# side of the shape's bounding box, as a fraction of the image side
SIZES = {"small": 0.4, "medium": 0.54, "large": 0.68}
# cell of a 3x3 grid -> phrase; centres at 1/4, 1/2, 3/4 of the image
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
POSITIONS = {
    ("middle", "center"): "in the center",
    ("middle", "left"): "on the left",
    ("middle", "right"): "on the right",
    ("top", "center"): "at the top",
    ("bottom", "center"): "at the bottom",
    ("top", "left"): "in the top left corner",
    ("top", "right"): "in the top right corner",
    ("bottom", "left"): "in the bottom left corner",
    ("bottom", "right"): "in the bottom right corner",
}
CELL_CENTRE = {"top": 0.25, "middle": 0.5, "bottom": 0.75, "left": 0.25, "center": 0.5, "right": 0.75}
MARGIN = 0.04  # the shape never touches the border, so the border shows the background


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    size: str
    row: str
    col: str
    box: tuple  # (x0, y0, x1, y1) in [0, 1] image coordinates

    @property
    def position(self):
        return POSITIONS[(self.row, self.col)]


def place(size, row, col, rng):
    """Bounding box of a shape of `size` in grid cell (row, col), jittered, kept inside the image."""
    side = SIZES[size] * rng.uniform(0.9, 1.1)
    half = side / 2
    lo, hi = MARGIN + half, 1 - MARGIN - half
    cx = float(np.clip(CELL_CENTRE[col] + rng.uniform(-0.06, 0.06), lo, hi))
    cy = float(np.clip(CELL_CENTRE[row] + rng.uniform(-0.06, 0.06), lo, hi))
    return (cx - half, cy - half, cx + half, cy + half)


def random_scene(rng, shape=None, colour=None, background=None, size=None, row=None, col=None):
    """A scene with the given attributes, the others drawn at random (background never = colour)."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    names = list(COLOURS)
    colour = colour or names[rng.integers(len(names))]
    if background is None:
        others = [c for c in names if c != colour]
        background = others[rng.integers(len(others))]
    if background == colour:
        raise ValueError(f"background={background!r} equals colour={colour!r}: the shape would be invisible")
    size = size or list(SIZES)[rng.integers(len(SIZES))]
    row = row or ROWS[rng.integers(3)]
    col = col or COLS[rng.integers(3)]
    return Scene(shape, colour, background, size, row, col, place(size, row, col, rng))


# --- drawing ------------------------------------------------------------------------------------

def _star_points(n=5, inner=0.5):
    """A five-pointed star, point up, scaled to fill the unit box exactly."""
    angles = np.pi / 2 + np.arange(2 * n) * np.pi / n
    radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    x, y = radii * np.cos(angles), -radii * np.sin(angles)
    x = (x - x.min()) / (x.max() - x.min())
    y = (y - y.min()) / (y.max() - y.min())
    return list(zip(x, y))


UNIT_OUTLINES = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],  # point up, base = height
    "star": _star_points(),
}


def coverage(shape, box, resolution=RESOLUTION):
    """Fraction of each pixel covered by `shape` filling `box` (image coordinates in [0, 1]): (H, W) float32."""
    big = resolution * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    x0, y0, x1, y1 = (v * big for v in box)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape in UNIT_OUTLINES:
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in UNIT_OUTLINES[shape]], fill=255)
    else:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}")
    a = np.asarray(canvas, dtype=np.float32) / 255.0
    return a.reshape(resolution, SUPERSAMPLE, resolution, SUPERSAMPLE).mean(axis=(1, 3))


def draw(scene, resolution=RESOLUTION):
    """The scene as an (H, W, 3) uint8 RGB image."""
    a = coverage(scene.shape, scene.box, resolution)[..., None]
    fg = np.array(COLOURS[scene.colour], np.float32)
    bg = np.array(COLOURS[scene.background], np.float32)
    return np.round(bg * (1 - a) + fg * a).astype(np.uint8)


# --- captions -----------------------------------------------------------------------------------
# Templates that leave out the size or position teach the model to choose them itself, so short
# prompts ("a red circle on a blue background") work as well as full ones.
TEMPLATES = (
    (0.40, "a {size} {colour} {shape} {position}, {background} background"),
    (0.20, "a {colour} {shape} on a {background} background"),
    (0.15, "a {size} {colour} {shape} on a {background} background"),
    (0.15, "a {colour} {shape} {position} on a {background} background"),
    (0.10, "a {colour} {shape}, {background} background"),
)


def caption(scene, rng=None, template=None):
    """Plain-English caption of `scene`: the given template (index) or one drawn from TEMPLATES."""
    if template is None:
        p = np.array([w for w, _ in TEMPLATES])
        template = int(rng.choice(len(TEMPLATES), p=p / p.sum()))
    text = TEMPLATES[template][1].format(size=scene.size, colour=scene.colour, shape=scene.shape,
                                         position=scene.position, background=scene.background)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "an orange square", as people write it


def caption_words():
    """Every word the grammar can write, in a fixed order (the tokenizer's whole-word vocabulary)."""
    words = []
    for text in [t for _, t in TEMPLATES] + list(POSITIONS.values()):
        for w in text.replace(",", " ").split():
            if not w.startswith("{") and w not in words:
                words.append(w)
    for w in list(SIZES) + list(COLOURS) + list(SHAPES) + ["an"]:
        if w not in words:
            words.append(w)
    return words


def dataset(n, seed, resolution=RESOLUTION):
    """n drawn images (n, H, W, 3) uint8, their captions and scenes, all from `seed`."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, resolution, resolution, 3), np.uint8)
    captions, scenes = [], []
    for i in range(n):
        scene = random_scene(rng)
        images[i] = draw(scene, resolution)
        captions.append(caption(scene, rng))
        scenes.append(scene)
    return images, captions, scenes


def to_tensor(images):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the range Stable Diffusion's VAE works in."""
    import torch
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0
