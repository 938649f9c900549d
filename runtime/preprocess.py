"""Image preprocessing for MiniCPM-V, torch-free (numpy + Pillow), bit-exact with Hugging Face.

Mirrors `MiniCPMVImageProcessor` of the MiniCPM-V 2.6 / 4.0 / 4.5 remote code (LLaVA-UHD slicing,
docs/model.md §5) and the bucketed NaViT position ids of `MiniCPMVisionEmbeddings` (docs/model.md §3.2):

* slicing: Python's banker's `round` in `ensure_divide`, the `W*H > S*S` rule, `allow_upscale` only for
  an un-sliced image and for the refined cells, PIL `Image.Resampling.BICUBIC` on uint8 RGB;
* normalisation: float32 `x / 255`, then `(x - mean) / std`, channels first;
* the overview ("source") slice first, then the cells of the grid row by row.

Input handling (not part of the HF image processor itself, which receives an already decoded image):
the EXIF orientation is applied with `ImageOps.exif_transpose` (as `transformers.image_utils.load_image`
does), then `img.convert("RGB")` exactly as the HF processor calls it (alpha is dropped, not composited;
16-bit grey values above 255 clip to 255; CMYK uses Pillow's naive conversion). Images with more than
`max_pixels` pixels are refused before anything is decoded or copied.

`slicing="llava_uhd_v46"` (MiniCPM-V 4.6) is a separate small branch mirroring transformers'
`models/minicpmv4_6/image_processing_pil_minicpmv4_6.py`; see `slice_image_v46`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS", "SLICINGS", "Slice", "PreprocessedImage",
    "ensure_divide", "find_best_resize", "get_refine_size", "get_sliced_grid", "split_to_patches",
    "slice_image", "get_sliced_grid_v46", "slice_image_v46", "downsample_side",
    "normalize", "reshape_by_patch", "position_bucket_ids", "position_nearest_ids", "POSITION_ID_RULES",
    "vision_position_ids", "preprocess_image",
]

# Pillow refuses to open files above 2 * Image.MAX_IMAGE_PIXELS (its default DecompressionBombError
# threshold, 178_956_970 px, ~537 MB as RGB). We refuse at the same size so any image Pillow opens with
# its defaults is accepted, and a caller-built image cannot be larger. The model never sees more than
# ~(1 + max_slice_nums) * 448^2 pixels; a tighter cap for small devices is a caller's choice.
DEFAULT_MAX_PIXELS = 178_956_970

SLICINGS = ("llava_uhd", "llava_uhd_v46")

_BICUBIC = Image.Resampling.BICUBIC

Role = Union[str, Tuple[int, int]]  # "source" or (row, col)


# --------------------------------------------------------------------------- LLaVA-UHD (2.6 / 4.0 / 4.5)

def ensure_divide(length: float, patch_size: int) -> int:
    """HF `ensure_divide`: nearest multiple of `patch_size` (banker's `round`, so 32.5 -> 32), at least one."""
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(original_size: tuple[float, float], scale_resolution: int, patch_size: int,
                     allow_upscale: bool = False) -> tuple[int, int]:
    """HF `find_best_resize`: (W, H) scaled to about `scale_resolution`^2 area, sides multiples of `patch_size`.

    The rescale happens only if the area exceeds `scale_resolution`^2 or `allow_upscale` is set; H is
    truncated first and W derived from the truncated H.
    """
    width, height = original_size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(original_size: tuple[int, int], grid: tuple[int, int], scale_resolution: int,
                    patch_size: int, allow_upscale: bool = False) -> tuple[int, int]:
    """HF `get_refine_size`: (W, H) of the image the grid cells are cut from; each cell is `find_best_resize`d."""
    width, height = original_size
    grid_x, grid_y = grid
    refine_width = ensure_divide(width, grid_x)  # divisor is the cell count, not the patch size
    refine_height = ensure_divide(height, grid_y)
    cell_w, cell_h = find_best_resize((refine_width / grid_x, refine_height / grid_y),
                                      scale_resolution, patch_size, allow_upscale=allow_upscale)
    return cell_w * grid_x, cell_h * grid_y


def _grid_candidates(image_size: tuple[int, int], max_slice_nums: int, scale_resolution: int):
    """Shared head of HF `get_sliced_grid`: (log aspect ratio, slice counts to try) or None if no slicing."""
    width, height = image_size
    log_ratio = math.log(width / height)
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1:
        return None
    return log_ratio, [k for k in (multiple - 1, multiple, multiple + 1) if k != 1 and k <= max_slice_nums]


def get_sliced_grid(image_size: tuple[int, int], max_slice_nums: int, scale_resolution: int = 448,
                    never_split: bool = False) -> tuple[int, int] | None:
    """HF `get_sliced_grid` (its `nerver_split`): (cols, rows) whose aspect is closest in log space, or None.

    Candidates are enumerated per slice count (multiple-1, multiple, multiple+1) with cols = 1..k; the
    first minimum wins (strict `<`).
    """
    head = _grid_candidates(image_size, max_slice_nums, scale_resolution)
    if head is None or never_split:
        return None
    log_ratio, counts = head
    best, min_error = (1, 1), float("inf")
    for k in counts:
        for cols in range(1, k + 1):
            if k % cols == 0:
                error = abs(log_ratio - math.log(cols / (k // cols)))
                if error < min_error:
                    best, min_error = (cols, k // cols), error
    return best


def split_to_patches(image: Image.Image, grid: tuple[int, int]) -> list[list[Image.Image]]:
    """HF `split_to_patches`: PIL crops of the refined image, rows outer, cols inner."""
    width, height = image.size
    cell_w, cell_h = int(width / grid[0]), int(height / grid[1])
    return [[image.crop((x, y, x + cell_w, y + cell_h)) for x in range(0, width, cell_w)]
            for y in range(0, height, cell_h)]


def _slice(image: Image.Image, grid: tuple[int, int] | None, scale_resolution: int, align: int):
    """Body of HF `slice_image` once the grid is known; `align` is the side multiple (patch size)."""
    if grid is None:  # not sliced: resize up or down to ~S^2
        size = find_best_resize(image.size, scale_resolution, align, allow_upscale=True)
        return image.resize(size, resample=_BICUBIC), []
    source = image.resize(find_best_resize(image.size, scale_resolution, align), resample=_BICUBIC)
    refine_size = get_refine_size(image.size, grid, scale_resolution, align, allow_upscale=True)
    return source, split_to_patches(image.resize(refine_size, resample=_BICUBIC), grid)


def slice_image(img: Image.Image, max_slice_nums: int, scale_resolution: int = 448, patch_size: int = 14,
                never_split: bool = False
                ) -> tuple[Image.Image, list[list[Image.Image]], tuple[int, int] | None]:
    """HF `slice_image`: (overview image, cells [row][col], grid (cols, rows) or None)."""
    grid = get_sliced_grid(img.size, max_slice_nums, scale_resolution, never_split)
    source, patches = _slice(img, grid, scale_resolution, patch_size)
    return source, patches, grid


# --------------------------------------------------------------------------- MiniCPM-V 4.6 variant

def downsample_side(downsample_mode: str) -> int:
    """Patches merged per side in a 4.6-style `downsample_mode` ("16x": 4, "4x": 2), from the facts table."""
    from minicpmv_edge.facts import MODEL_FACTS

    facts = next(f for f in MODEL_FACTS.values() if f.slicing == "llava_uhd_v46")
    return facts.downsample_side(downsample_mode)


def get_sliced_grid_v46(image_size: tuple[int, int], max_slice_nums: int,
                        scale_resolution: int = 448) -> tuple[int, int] | None:
    """transformers `MiniCPMV4_6ImageProcessorPil.get_sliced_grid`, returned as (cols, rows).

    Differs from `get_sliced_grid` only in enumeration (rows = 1..k) and the tie-break: on an exactly
    equal error the grid with more rows wins. No integer image size is known where the two rules pick
    different grids (tests/test_preprocess.py checks every exact-tie aspect ratio).
    """
    head = _grid_candidates(image_size, max_slice_nums, scale_resolution)
    if head is None:
        return None
    log_ratio, counts = head
    best_rows, best_cols, min_error = 1, 1, float("inf")
    for k in counts:
        for rows in range(1, k + 1):
            if k % rows == 0:
                cols = k // rows
                error = abs(log_ratio - math.log(cols / rows))
                if error < min_error or (error == min_error and rows > best_rows):
                    best_rows, best_cols, min_error = rows, cols, error
    return best_cols, best_rows


def slice_image_v46(img: Image.Image, max_slice_nums: int, scale_resolution: int = 448, patch_size: int = 14,
                    downsample_mode: str = "16x"
                    ) -> tuple[Image.Image, list[list[Image.Image]], tuple[int, int] | None]:
    """transformers MiniCPM-V 4.6 slicing: as `slice_image`, but sides are multiples of
    `patch_size * merge` (merge 4 for "16x", 2 for "4x": the vision graph's 2x2 token mergers, so 56 / 28 px
    at patch 14, as `MiniCPMV4_6ImageProcessorPil.find_best_resize`'s merge_factor) and the v46 grid rule."""
    merge = downsample_side(downsample_mode)
    grid = get_sliced_grid_v46(img.size, max_slice_nums, scale_resolution)
    source, patches = _slice(img, grid, scale_resolution, patch_size * merge)
    return source, patches, grid


def _to_rgb_composited(img: Image.Image) -> Image.Image:
    """transformers `image_transforms.convert_to_rgb` (used by the 4.6 processor): alpha over white."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------------- pixels

def normalize(img: Image.Image | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """HF `preprocess` pixel path: float32 `x / 255`, `(x - mean) / std` (float32), HWC -> [3, H, W]."""
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def reshape_by_patch(pixels: np.ndarray, patch_size: int = 14) -> np.ndarray:
    """HF `reshape_by_patch`: [C, H, W] -> [C, P, N*P], patch n (row-major) in columns n*P .. n*P+P-1."""
    c, h, w = pixels.shape
    p = pixels.reshape(c, h // patch_size, patch_size, w // patch_size, patch_size)
    return np.ascontiguousarray(p.transpose(0, 2, 1, 3, 4).reshape(c, patch_size, -1))


# --------------------------------------------------------------------------- position ids

# Lanes of torch's CPU `Vectorized<float>`: 8 on every x86 build (DEFAULT, AVX2; the arange kernel has no
# AVX-512 variant, so AVX512 machines use AVX2). aarch64 NEON builds use 4 lanes (vec128) -- not verified here.
TORCH_CPU_FLOAT_LANES = 8


def _torch_cpu_arange_f32(start: float, end: float, step: float, lanes: int = TORCH_CPU_FLOAT_LANES) -> np.ndarray:
    """float32 `torch.arange(start, end, step)` on CPU, bit for bit (checked against torch 2.13).

    torch computes the length as ceil((end - start) / step) in double. Its kernel then writes blocks of
    2*lanes elements with `Vectorized<float>::arange(base, step)`, base = float(start + step*i0) rounded
    to float32 and element k = float(base + k*step) in double; the tail (< 2*lanes elements) is scalar:
    float(start + step*i) in double.
    """
    n = max(math.ceil((end - start) / step), 0)
    idx = np.arange(n, dtype=np.int64)
    out = (start + step * idx.astype(np.float64)).astype(np.float32)
    nvec = n // (2 * lanes) * (2 * lanes)
    if nvec:
        lane = idx[:nvec] % lanes
        base = (start + step * (idx[:nvec] - lane).astype(np.float64)).astype(np.float32)
        out[:nvec] = (base.astype(np.float64) + lane.astype(np.float64) * step).astype(np.float32)
    return out


@lru_cache(maxsize=8)
def _boundaries(num_patches_per_side: int, lanes: int) -> np.ndarray:
    """`torch.arange(1 / nps, 1.0, 1 / nps)` (float32), the bucket edges of HF `MiniCPMVisionEmbeddings`."""
    b = _torch_cpu_arange_f32(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side, lanes)
    b.setflags(write=False)
    return b


def _buckets(nb: int, num_patches_per_side: int, step_dtype: str, lanes: int) -> np.ndarray:
    if step_dtype == "float32":  # HF: nb is an element of the int32 `tgt_sizes` tensor -> 1/nb is float32
        step = float(np.float32(1) / np.float32(nb))
    elif step_dtype == "float64":  # nb as a Python int -> 1/nb is a double
        step = 1 / nb
    else:
        raise ValueError(f"step_dtype must be 'float32' or 'float64', got {step_dtype!r}")
    frac = _torch_cpu_arange_f32(0, 1 - 1e-6, step, lanes)
    return np.searchsorted(_boundaries(num_patches_per_side, lanes), frac, side="right")  # bucketize(right=True)


def position_bucket_ids(h: int, w: int, num_patches_per_side: int = 70, *, step_dtype: str = "float32",
                        lanes: int = TORCH_CPU_FLOAT_LANES) -> np.ndarray:
    """Position ids of HF `MiniCPMVisionEmbeddings.forward` for one slice of h x w patches, int64 (h*w,).

    Reproduces `bucketize(arange(0, 1 - 1e-6, 1 / nb), arange(1/70, 1, 1/70), right=True)` exactly; this is
    NOT `floor(70 * i / nb)` (differs e.g. for nb = 25, 49, 50, 55, 58, 77, 82, 86, 94, 98, 100).
    `step_dtype="float32"` is what the model code does (nb taken from the int32 `tgt_sizes` tensor, so the
    step is a float32 tensor); "float64" is the same expression with a Python int nb.
    """
    if h < 1 or w < 1:
        raise ValueError(f"slice must have at least one patch per side, got {h}x{w}")
    bh = _buckets(h, num_patches_per_side, step_dtype, lanes)
    bw = _buckets(w, num_patches_per_side, step_dtype, lanes)
    return (bh[:, None] * num_patches_per_side + bw[None, :]).reshape(-1).astype(np.int64)


def position_nearest_ids(h: int, w: int, num_patches_per_side: int = 70) -> np.ndarray:
    """MiniCPM-V 4.6 position ids (transformers `vision_utils.get_vision_nearest_position_ids`), int64 (h*w,).

    `bucketize(arange(n) / n, arange(1/70, 1, 1/70), right=True)`: the coordinates i/n are float32 divisions
    of exact integers (correctly rounded, so no arange quirk), the bucket edges are the same float32
    `torch.arange` as `position_bucket_ids`. Differs from the legacy rule for some n (e.g. n = 25).
    """
    if h < 1 or w < 1:
        raise ValueError(f"slice must have at least one patch per side, got {h}x{w}")
    edges = _boundaries(num_patches_per_side, TORCH_CPU_FLOAT_LANES)

    def buckets(n: int) -> np.ndarray:
        return np.searchsorted(edges, np.arange(n, dtype=np.float32) / np.float32(n), side="right")

    return (buckets(h)[:, None] * num_patches_per_side + buckets(w)[None, :]).reshape(-1).astype(np.int64)


POSITION_ID_RULES = {"bucketize": position_bucket_ids, "nearest": position_nearest_ids}


def vision_position_ids(h: int, w: int, num_patches_per_side: int = 70, rule: str = "bucketize") -> np.ndarray:
    """Position ids of one h x w slice under `rule` (`facts.vision_position_ids`)."""
    if rule not in POSITION_ID_RULES:
        raise ValueError(f"unknown position-id rule {rule!r}; expected one of {sorted(POSITION_ID_RULES)}")
    return POSITION_ID_RULES[rule](h, w, num_patches_per_side)


# --------------------------------------------------------------------------- whole image

@dataclass
class Slice:
    """One ViT input: the overview image ("source") or one grid cell (row, col)."""
    pixels: np.ndarray                 # [3, H, W] float32, normalised
    tgt_size: tuple[int, int]          # (H // patch, W // patch): the HF `tgt_sizes` row
    role: Role                         # "source" or (row, col)
    image: Image.Image | None = field(default=None, repr=False, compare=False)  # resized uint8 RGB

    def position_ids(self, num_patches_per_side: int = 70, rule: str = "bucketize") -> np.ndarray:
        """`vision_position_ids` for this slice (`rule` is `facts.vision_position_ids`)."""
        return vision_position_ids(*self.tgt_size, num_patches_per_side, rule)


@dataclass
class PreprocessedImage:
    """Slices of one image in HF order (source first, then cells row-major) and the grid (cols, rows)."""
    slices: list[Slice]
    grid: tuple[int, int] | None
    image_size: tuple[int, int]        # (W, H) after EXIF orientation: what the placeholder grid is derived from

    @property
    def tgt_sizes(self) -> np.ndarray:
        """[n_slices, 2] int64 (h, w) in patches, like HF's `tgt_sizes`."""
        return np.array([s.tgt_size for s in self.slices], dtype=np.int64).reshape(-1, 2)

    def slice_tokens(self, merge_side: int) -> list[int]:
        """LLM tokens per slice when the vision graph merges `merge_side` x `merge_side` patches (4.6 mergers)."""
        return [h * w // (merge_side * merge_side) for h, w in (s.tgt_size for s in self.slices)]


def _check_size(img: Image.Image, max_pixels: int | None) -> None:
    width, height = img.size
    if width < 1 or height < 1:
        raise ValueError(f"image has no pixels: size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"image of {width}x{height} = {width * height:,} pixels exceeds the limit "
                         f"max_pixels={max_pixels:,}; downscale it first or pass a larger max_pixels")


def preprocess_image(img: Image.Image, *, max_slice_nums: int = 9, slice_size: int = 448, patch_size: int = 14,
                     mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                     slicing: str = "llava_uhd", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     downsample_mode: str = "16x") -> PreprocessedImage:
    """HF `MiniCPMVImageProcessor.preprocess` for one image: orient, RGB, slice, normalise.

    `slicing` is `facts.slicing`. `downsample_mode` is read only by "llava_uhd_v46", which also converts
    transparency over white as the transformers 4.6 processor does. Raises ValueError above `max_pixels`.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(img).__name__}")
    if slicing not in SLICINGS:
        raise ValueError(f"unknown slicing {slicing!r}; expected one of {SLICINGS}")
    if max_slice_nums < 1:
        raise ValueError(f"max_slice_nums must be >= 1, got {max_slice_nums}")
    _check_size(img, max_pixels)  # before exif_transpose / convert, which may decode and copy
    img = ImageOps.exif_transpose(img)
    if slicing == "llava_uhd":
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        source, cells, grid = slice_image(rgb, max_slice_nums, slice_size, patch_size)
    else:
        rgb = _to_rgb_composited(img)
        source, cells, grid = slice_image_v46(rgb, max_slice_nums, slice_size, patch_size, downsample_mode)
    roles: list[tuple[Role, Image.Image]] = [("source", source)]
    roles += [((r, c), cell) for r, row in enumerate(cells) for c, cell in enumerate(row)]
    slices = [Slice(normalize(im, mean, std), (im.height // patch_size, im.width // patch_size), role, im)
              for role, im in roles]
    return PreprocessedImage(slices=slices, grid=grid, image_size=rgb.size)

