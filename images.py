"""Images: how a model family sees them (`Vision`), InternVL's dynamic tiling, reading any image file as 8-bit RGB,
and a cache of decoded tiles.

An image is cut into the grid of at most max_num_tiles square tiles whose aspect ratio is closest to its own, plus
a thumbnail of the whole image when there is more than one tile; the vision tower takes the tiles normalised with
ImageNet's mean and standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from utils import UserError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class Vision:
    """How a vision-language model sees images, as its family describes it (`models.family`): the pixel size of one
    square tile, the context tokens one tile becomes, and the text of an image block: `start`, the `context` token
    once per context token of every tile, `end`. A text-only model has none."""

    tile: int
    tokens_per_tile: int
    start: str
    context: str
    end: str

    def block(self, n_tiles: int) -> str:
        """The text of one image of `n_tiles` tiles in a prompt."""
        return self.start + self.context * (n_tiles * self.tokens_per_tile) + self.end


def image_paths(record: dict, data_path: str, image_root: str) -> list[Path]:
    """The record's image files, relative to `image_root` or else to the data file's folder."""
    image = record.get("image")
    paths = [] if image is None else [image] if isinstance(image, str) else image
    root = Path(image_root) if image_root else Path(data_path).parent
    return [root / p for p in paths]


def tile_grid(width: int, height: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """InternVL's choice of (columns, rows): the grid with columns*rows <= max_tiles whose aspect ratio is closest
    to the image's; among equally close grids, a larger one wins when the image has more than half its pixels."""
    grids = sorted(
        {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles},
        key=lambda g: (g[0] * g[1], g),
    )
    aspect = width / height
    best, best_diff = (1, 1), math.inf
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, tile: int, max_tiles: int, use_thumbnail: bool) -> int:
    """How many tiles `tile_image` cuts an image of this size into (the thumbnail included)."""
    cols, rows = tile_grid(width, height, tile, max_tiles)
    return cols * rows + (1 if use_thumbnail and cols * rows > 1 else 0)


def tile_image(image: Image.Image, tile: int, max_tiles: int, use_thumbnail: bool) -> np.ndarray:
    """Cut an RGB image into InternVL's dynamic tiles: uint8 array of shape (tiles, tile, tile, 3).

    The image is resized to the chosen grid and cut row by row; when there is more than one tile, a thumbnail
    of the whole image follows.
    """
    cols, rows = tile_grid(image.width, image.height, tile, max_tiles)
    # reducing_gap: a huge image is first shrunk by whole factors, so tiling cost stays bounded
    grid = np.asarray(image.resize((cols * tile, rows * tile), Image.Resampling.BICUBIC, reducing_gap=3.0))
    tiles = grid.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile, tile, 3)
    if use_thumbnail and len(tiles) > 1:
        thumb = np.asarray(image.resize((tile, tile), Image.Resampling.BICUBIC, reducing_gap=3.0))
        tiles = np.concatenate([tiles, thumb[None]])
    return tiles


def patch_box(index: int, width: int, height: int, vision: Vision, max_tiles: int) -> tuple[float, float, float, float]:
    """The part of a width x height image (left, top, right, bottom, in its pixels) that image-context token `index`
    of its block sees. Pixel shuffle makes each tile a square grid of tokens_per_tile tokens, row by row; `tile_image`
    cuts the tiles row by row, and the tile after them (a thumbnail of the whole image) sees the whole image in
    coarser cells."""
    side = math.isqrt(vision.tokens_per_tile)
    tile, cell = divmod(index, vision.tokens_per_tile)
    row, col = divmod(cell, side)
    cols, rows = tile_grid(width, height, vision.tile, max_tiles)
    if tile >= cols * rows:  # the thumbnail
        cols = rows = 1
        tile = 0
    tile_row, tile_col = divmod(tile, cols)
    cell_width, cell_height = width / (cols * side), height / (rows * side)
    left, top = (tile_col * side + col) * cell_width, (tile_row * side + row) * cell_height
    return left, top, left + cell_width, top + cell_height


def draw_patches(image: Image.Image, picks: list[list[int]], vision: Vision, max_tiles: int) -> Image.Image:
    """A copy of `image` with the cells of each thought's chosen image-context tokens (`picks`, per thought, indices
    into this image's block) outlined, one colour per thought (cycling through six), numbered by thought; cells of
    the thumbnail tile are drawn over the whole image, as it sees it."""
    colours = ("red", "lime", "blue", "yellow", "magenta", "cyan")
    drawn = to_rgb(image).copy()
    pen = ImageDraw.Draw(drawn)
    for n, indices in enumerate(picks):
        for index in indices:
            box = patch_box(index, image.width, image.height, vision, max_tiles)
            pen.rectangle(box, outline=colours[n % len(colours)])
            pen.text((box[0] + 1, box[1]), str(n + 1), fill=colours[n % len(colours)])
    return drawn


def tiles_to_tensor(tiles: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) tiles to the float (N, 3, H, W) tensor the vision tower takes (ImageNet mean/std)."""
    x = (tiles.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@contextmanager
def image_file(path: Path, where: str) -> Iterator[Image.Image]:
    """Open an image file lazily (header only until pixels are used); a missing or unreadable file stops with
    one line naming the record and the file."""
    try:
        with Image.open(path) as image:
            yield image
    except FileNotFoundError:
        raise UserError(f"{where}: image {path} not found; fix the path or set image_root") from None
    except Image.DecompressionBombError:
        raise UserError(f"{where}: image {path} has too many pixels to decode safely; downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{where}: image {path} cannot be read ({err}); replace the file") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: grey, palette and alpha images convert directly; 16-bit and 32-bit grey are
    scaled to 8 bits first (a plain conversion would clip them)."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        image = Image.fromarray(np.clip(values / top * 255.0, 0, 255).astype(np.uint8))
    return image.convert("RGB")


class TileCache:
    """Decoded tiles by image path, up to `limit` bytes; one object, so a dataset and its `prompts()` view share
    the tiles and the budget."""

    def __init__(self, limit: int) -> None:
        self.tiles: dict[Path, np.ndarray] = {}
        self.limit, self.bytes = limit, 0

    def add(self, path: Path, tiles: np.ndarray) -> None:
        """Keep `tiles` if they fit in what is left of the budget."""
        if self.bytes + tiles.nbytes <= self.limit:
            self.tiles[path] = tiles
            self.bytes += tiles.nbytes
