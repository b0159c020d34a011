"""The image helpers diffusers' snippets import from diffusers.utils: load_image and make_image_grid."""
import io
import os

from PIL import Image, ImageOps


def load_image(image, convert_method=None, timeout=10):
    """A PIL image from a path, an http(s) URL or a PIL image, turned upright by its EXIF orientation and
    converted to RGB (or by `convert_method(image)`), as diffusers.utils.load_image."""
    if isinstance(image, (str, os.PathLike)):
        image = os.fspath(image)
        if image.startswith(("http://", "https://")):
            import urllib.error
            import urllib.request
            try:
                with urllib.request.urlopen(image, timeout=timeout) as response:
                    data = response.read()
            except (urllib.error.URLError, OSError) as e:
                raise OSError(f"load_image: could not download {image} ({e}); save the image and pass its "
                              "path instead") from None
            image = Image.open(io.BytesIO(data))
        elif os.path.isfile(image):
            image = Image.open(image)
        else:
            raise ValueError(f"load_image: {image!r} is neither a file nor an http(s):// URL")
    elif not isinstance(image, Image.Image):
        raise ValueError(f"load_image takes a path, a URL or a PIL image, not {type(image).__name__}")
    image = ImageOps.exif_transpose(image)
    return convert_method(image) if convert_method is not None else image.convert("RGB")


def make_image_grid(images, rows, cols, resize=None):
    """`rows` x `cols` images pasted row by row into one RGB image (each resized to resize x resize first)."""
    if len(images) != rows * cols:
        raise ValueError(f"make_image_grid: {len(images)} images do not fill {rows} rows x {cols} cols")
    if resize is not None:
        images = [im.resize((resize, resize)) for im in images]
    w, h = images[0].size
    grid = Image.new("RGB", size=(cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, box=(i % cols * w, i // cols * h))
    return grid
