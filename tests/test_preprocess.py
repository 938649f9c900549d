"""Tests for minicpmv_edge.runtime.preprocess against independent references.

(a) Slicing: transformers 5.23's `MiniCPMV4_6ImageProcessorPil` (models/minicpmv4_6). Its slicing is the
    MiniCPM-V 2.6/4.5 algorithm except that (1) `find_best_resize` aligns sides to `patch_size * merge`
    (merge 2 for downsample_mode "4x") instead of `patch_size`, and (2) `get_sliced_grid` enumerates
    rows = 1..k and breaks exact error ties towards more rows. Calling it with patch_size=7 and "4x"
    makes the alignment 14, i.e. the 2.6 geometry; its target sizes are then in 7-pixel units and its
    pixel_values in 7-patch layout, both converted back here. Tie cases are detected and listed.
(b) Position ids: real torch running the HF `MiniCPMVisionEmbeddings` code.
(c) Worked examples of docs/model.md §5. (d) Bad and unusual input.
"""
from __future__ import annotations

import io
import math
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from minicpmv_edge.facts import MODEL_FACTS
from minicpmv_edge.runtime import preprocess as pp
from minicpmv_edge.runtime import prompt

torch = pytest.importorskip("torch")
v46 = pytest.importorskip("transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6")
from transformers.image_processing_utils import SizeDict  # noqa: E402
from transformers.image_transforms import divide_to_patches  # noqa: E402

S = 448


@pytest.fixture(scope="module")
def ref():
    return v46.MiniCPMV4_6ImageProcessorPil()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise plus a gradient: every resampling difference shows in the pixels."""
    rng = np.random.default_rng(seed + 7919 * width + height)
    a = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    a[..., 0] = (a[..., 0] // 2 + (np.arange(width) * 255 // max(width, 1))[None, :] // 2).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def _sizes() -> list[tuple[int, int]]:
    fixed = [(1, 1), (1, 2), (2, 1), (3, 7), (14, 14), (13, 15), (100, 100), (224, 224), (300, 310),
             (447, 449), (448, 448), (449, 448), (448, 449), (455, 455), (455, 441), (441, 455), (462, 300),
             (455, 1000), (1000, 455), (640, 480), (480, 640), (800, 600), (1024, 768), (1280, 720),
             (720, 1280), (1344, 1344), (1343, 1345), (1920, 1080), (1080, 1920), (2000, 1000), (896, 448),
             (448, 896), (1792, 448), (448, 1792), (4000, 300), (300, 4000), (4000, 1), (1, 4000), (1000, 1),
             (1, 1000), (2000, 3), (3, 2000), (4000, 40), (40, 4000), (1500, 1500), (2048, 1536), (3000, 200),
             (2500, 2500), (1234, 567), (567, 1234), (999, 1001), (1001, 999), (672, 672), (673, 671)]
    rng = np.random.default_rng(1234)
    rand = []
    while len(rand) < 170:
        area = math.exp(rng.uniform(math.log(50), math.log(2.5e6)))
        aspect = math.exp(rng.uniform(math.log(1 / 40), math.log(40)))
        w, h = max(1, round(math.sqrt(area * aspect))), max(1, round(math.sqrt(area / aspect)))
        if w <= 4000 and h <= 4000:
            rand.append((w, h))
    return list(dict.fromkeys(fixed + rand))


def _grid_errors(size, max_slice_nums):
    """All (error, grid) of the 2.6 candidate list, to spot exact ties at the minimum."""
    width, height = size
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (S * S)), max_slice_nums)
    ks = [k for k in (multiple - 1, multiple, multiple + 1) if k != 1 and k <= max_slice_nums]
    return [(abs(log_ratio - math.log(c / (k // c))), (c, k // c)) for k in ks for c in range(1, k + 1) if k % c == 0]


def _ref_geometry(ref, size, max_slice_nums):
    """(grid (cols, rows) | None, source (W, H), refine (W, H) | None) from the 4.6 reference at align 14."""
    width, height = size
    g = ref.get_sliced_grid((height, width), max_slice_nums, S)
    sh, sw = ref.find_best_resize((height, width), S, 7, "4x", allow_upscale=g is None)
    if g is None:
        return None, (sw, sh), None
    rh, rw = ref.get_refine_size((height, width), g, S, 7, "4x", allow_upscale=True)
    return (g[1], g[0]), (sw, sh), (rw, rh)


def _ref_uint8_slices(ref, img, geom):
    """Resized uint8 slices ([3,H,W]) produced by the reference's own resize / divide_to_patches."""
    grid, (sw, sh), refine = geom
    chw = np.moveaxis(np.asarray(img), -1, 0)
    bicubic = v46.PILImageResampling.BICUBIC
    out = [ref.resize(chw, SizeDict(height=sh, width=sw), resample=bicubic)]
    if grid is not None:
        rw, rh = refine
        r = ref.resize(chw, SizeDict(height=rh, width=rw), resample=bicubic)
        out += divide_to_patches(r, (rh // grid[1], rw // grid[0]))
    return out


# ------------------------------------------------------------------------------------------------ (a)

def test_llava_uhd_matches_transformers_reference(ref):
    sizes = _sizes()
    n_geom = n_pixel = n_full = 0
    ties = []
    seen: dict[tuple, None] = {}
    for size in sizes:
        img = _noise(*size)
        for m in range(1, 10):
            errors = _grid_errors(size, m) if size[0] * size[1] > S * S else []
            best = min((e for e, _ in errors), default=None)
            tie = best is not None and sum(e == best for e, _ in errors) > 1
            rgrid, rsrc, rref = _ref_geometry(ref, size, m)
            grid = pp.get_sliced_grid(size, m)
            if tie:  # the 4.6 tie-break could apply: list it, do not count it as a match
                ties.append((size, m, grid, rgrid))
                continue
            src = pp.find_best_resize(size, S, 14, allow_upscale=grid is None)
            refine = None if grid is None else pp.get_refine_size(size, grid, S, 14, allow_upscale=True)
            assert (grid, src, refine) == (rgrid, rsrc, rref), (size, m)
            n_geom += 1

            key = (size, grid, src, refine)
            if key in seen:  # same geometry as an earlier max_slice_nums: identical pixels
                continue
            seen[key] = None
            ours = pp.preprocess_image(img, max_slice_nums=m)
            assert ours.grid == grid
            # uint8 after resize, against the reference's own resize + divide_to_patches
            ref_u8 = _ref_uint8_slices(ref, img, (rgrid, rsrc, rref))
            assert len(ref_u8) == len(ours.slices)
            for s, r in zip(ours.slices, ref_u8):
                a = np.moveaxis(np.asarray(s.image), -1, 0)
                assert a.shape == r.shape, (size, m, s.role)
                assert int(np.abs(a.astype(np.int16) - r.astype(np.int16)).max()) == 0, (size, m, s.role)
            n_pixel += 1
            # the full reference pipeline (rescale, normalise, reshape_by_patch) on a subset
            if len(seen) % 4 == 1:
                out = ref(images=[img], max_slice_nums=m, patch_size=7, downsample_mode="4x")
                np.testing.assert_array_equal(out["target_sizes"], 2 * ours.tgt_sizes)
                pv = np.concatenate([pp.reshape_by_patch(s.pixels, 7) for s in ours.slices], axis=-1)
                assert pv.dtype == out["pixel_values"].dtype == np.float32
                assert np.array_equal(pv, out["pixel_values"][0]), (size, m)
                n_full += 1
    print(f"\n[a] llava_uhd vs transformers MiniCPMV4_6ImageProcessorPil (align 14): {len(sizes)} sizes x "
          f"max_slice_nums 1..9: {n_geom} cases with equal grid/source/refine sizes, {n_pixel} distinct "
          f"geometries with identical uint8 slices, {n_full} with identical normalised pixel_values; "
          f"{len(ties)} exact-tie cases excluded (size, max_slice_nums, ours, reference): {ties}; "
          f"grids agree on {sum(t[2] == t[3] for t in ties)} of them")
    assert n_geom > 1800 and n_pixel > 400


def test_grid_tie_break_rules_agree():
    """The v46 tie-break can change a grid only on an exact float tie of two candidate errors.

    Exact ties need W/H = sqrt(x1 * x2) for two candidate aspect ratios x1, x2; every such ratio is tried
    at every slice count, then a brute-force sweep covers small sizes.
    """
    from fractions import Fraction
    checked, differ = 0, []
    for m in range(1, 10):
        for mult in range(2, m + 1):
            ks = [k for k in (mult - 1, mult, mult + 1) if k != 1 and k <= m]
            ratios = {Fraction(c, k // c) for k in ks for c in range(1, k + 1) if k % c == 0}
            for x1 in ratios:
                for x2 in ratios:
                    p = x1 * x2
                    rn, rd = math.isqrt(p.numerator), math.isqrt(p.denominator)
                    if x1 >= x2 or rn * rn != p.numerator or rd * rd != p.denominator:
                        continue
                    q = Fraction(rn, rd)
                    for t in range(1, 4000):  # scale until the area lands in this slice count
                        w, h = q.numerator * t, q.denominator * t
                        if min(math.ceil(w * h / (S * S)), m) == mult:
                            checked += 1
                            if pp.get_sliced_grid((w, h), m) != pp.get_sliced_grid_v46((w, h), m):
                                differ.append(((w, h), m))
                            break
    for w in range(1, 900, 7):
        for h in range(1, 900, 5):
            for m in (2, 4, 6, 9):
                checked += 1
                if pp.get_sliced_grid((w, h), m) != pp.get_sliced_grid_v46((w, h), m):
                    differ.append(((w, h), m))
    print(f"\n[a] first-minimum vs v46 tie-break: {checked} cases, differing: {differ}")
    assert not differ


def _v46_reference_placeholder(out, image_idx: int, divisor: int, tokens) -> str:
    """transformers `MiniCPMV4_6Processor.replace_image_token` and `_prepend_local_ids` (image 0 of a sample),
    called on a stand-in holding only the token strings: the processor itself needs a tokenizer and torchvision."""
    from types import SimpleNamespace

    from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor

    me = SimpleNamespace(image_start_token=tokens["image_start"], image_end_token=tokens["image_end"],
                         slice_start_token=tokens["slice_start"], slice_end_token=tokens["slice_end"],
                         image_id_start_token=tokens["image_id_start"], image_id_end_token=tokens["image_id_end"],
                         image_token=tokens["image_pad"], slice_mode=True)
    text = MiniCPMV4_6Processor.replace_image_token(me, out, image_idx=image_idx, image_token_divisor=divisor)
    return MiniCPMV4_6Processor._prepend_local_ids(me, [tokens["image_pad"]], [text], tokens["image_pad"])[0]


def _v46_reference_layout(ref, size, m: int, mode: str) -> dict:
    """The reference's grid and target sizes from its own geometry methods (what its `_preprocess` does with
    them, minus the pixel work), in the shape `replace_image_token` reads."""
    width, height = size
    grid = ref.get_sliced_grid((height, width), m, S)
    sh, sw = ref.find_best_resize((height, width), S, 14, mode, allow_upscale=grid is None)
    sizes = [[sh // 14, sw // 14]]
    if grid is not None:
        rh, rw = ref.get_refine_size((height, width), grid, S, 14, mode, allow_upscale=True)
        sizes += [[rh // grid[0] // 14, rw // grid[1] // 14]] * (grid[0] * grid[1])
    return {"grids": [grid or [0, 0]], "num_patches_per_image": [len(sizes)],
            "target_sizes": np.array(sizes, dtype=np.int32)}


def test_v46_branch_matches_transformers(ref):
    """4.6 slicing, target sizes and `<|image_pad|>` placeholders against the transformers 4.6 image processor
    and processor in both downsample modes ("16x": sides multiple of 56 px, "4x": of 28 px, as the reference's
    merge_factor) over every size of `_sizes()`; the full pixel pipeline on every 9th size."""
    facts = MODEL_FACTS["4.6"]
    tokens = facts.special_tokens
    assert tokens["image_pad"] == "<|image_pad|>"
    n_geom = n_pixel = 0
    for i, size in enumerate(_sizes()):
        img = _noise(*size, seed=3) if i % 9 == 0 else None
        for mode in ("16x", "4x"):
            side = facts.downsample_side(mode)
            for m in (1, 4, 9):
                if i % 9 == 0:                                   # both whole pipelines, pixels compared
                    ours = pp.preprocess_image(img, max_slice_nums=m, slicing="llava_uhd_v46", downsample_mode=mode)
                    out = ref(images=[img], max_slice_nums=m, downsample_mode=mode)
                    pv = np.concatenate([pp.reshape_by_patch(s.pixels) for s in ours.slices], axis=-1)
                    assert np.array_equal(pv, out["pixel_values"][0]), (size, m, mode)
                    n_pixel += 1
                    grid, tgt = ours.grid, ours.tgt_sizes
                else:                                            # geometry only (no resizing: fast)
                    out = _v46_reference_layout(ref, size, m, mode)
                    grid = pp.get_sliced_grid_v46(size, m)
                    align = 14 * side
                    src = pp.find_best_resize(size, S, align, allow_upscale=grid is None)
                    tgt = [(src[1] // 14, src[0] // 14)]
                    if grid is not None:
                        rw, rh = pp.get_refine_size(size, grid, S, align, allow_upscale=True)
                        tgt += [(rh // grid[1] // 14, rw // grid[0] // 14)] * (grid[0] * grid[1])
                    tgt = np.array(tgt, dtype=np.int64)
                g = out["grids"][0]
                assert grid == (None if list(g) == [0, 0] else (g[1], g[0])), (size, m, mode)
                np.testing.assert_array_equal(out["target_sizes"], tgt)
                assert all(h % side == 0 and w % side == 0 for h, w in tgt.tolist()), (size, m, mode)
                counts = [h * w // (side * side) for h, w in tgt.tolist()]
                ph = prompt.image_placeholder(grid, 0, use_image_id=True, query_num=0, tokens=tokens,
                                          slice_tokens=counts)
                assert ph == _v46_reference_placeholder(out, 0, side * side, tokens), (size, m, mode)
                n_geom += 1
    rgba = np.array(_noise(500, 700, seed=5).convert("RGBA"))
    rgba[::3, :, 3] = 0
    rgba[1::3, :, 3] = 100
    img = Image.fromarray(rgba, "RGBA")
    ours = pp.preprocess_image(img, slicing="llava_uhd_v46")
    out = ref(images=[img])
    assert np.array_equal(np.concatenate([pp.reshape_by_patch(s.pixels) for s in ours.slices], -1),
                          out["pixel_values"][0])
    with pytest.raises(ValueError, match="downsample mode '8x'"):
        pp.preprocess_image(img, slicing="llava_uhd_v46", downsample_mode="8x")
    print(f"\n[a] llava_uhd_v46 vs transformers 4.6 processor: {n_geom} (size, mode, max_slice_nums) cases with "
          f"equal grid, target sizes and placeholder text; {n_pixel + 1} with identical pixel_values")
    assert n_geom > 1300 and n_pixel > 100


def test_v46_placeholder_counts():
    """1000x700 at 9 slices in both modes: the counts the issue states (patches/16, patches/4 per slice)."""
    tokens = MODEL_FACTS["4.6"].special_tokens
    for mode, div in (("16x", 16), ("4x", 4)):
        r = pp.preprocess_image(_noise(1000, 700), slicing="llava_uhd_v46", downsample_mode=mode)
        counts = r.slice_tokens(MODEL_FACTS["4.6"].downsample_side(mode))
        assert counts == [h * w // div for h, w in r.tgt_sizes.tolist()]
        text = prompt.image_placeholder(r.grid, 2, use_image_id=True, query_num=0, tokens=tokens, slice_tokens=counts)
        assert text.startswith("<image_id>2</image_id><image>") and text.count("<|image_pad|>") == sum(counts)
        assert text.count("\n") == r.grid[1] - 1 and text.count("<slice>") == r.grid[0] * r.grid[1]
    with pytest.raises(ValueError, match="slice token counts"):
        prompt.image_placeholder((2, 2), 0, use_image_id=False, query_num=0, tokens=tokens, slice_tokens=[4, 4])


def test_reshape_by_patch_matches_reference(ref):
    x = np.random.default_rng(0).standard_normal((3, 28, 42)).astype(np.float32)
    np.testing.assert_array_equal(pp.reshape_by_patch(x, 14), ref.reshape_by_patch(x, 14))
    # patch n occupies columns n*14 .. n*14+13 (docs/model.md §3.1)
    np.testing.assert_array_equal(pp.reshape_by_patch(x, 14)[:, :, 14 * 4:14 * 5], x[:, 14:28, 14:28])


# ------------------------------------------------------------------------------------------------ (b)

def _hf_position_ids(tgt_sizes: "torch.Tensor", num_patches_per_side: int = 70) -> list[np.ndarray]:
    """The loop of HF MiniCPMVisionEmbeddings.forward (modeling_minicpm_v_4_5), one slice per row."""
    boundaries = torch.arange(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side)
    out = []
    for batch_idx in range(tgt_sizes.shape[0]):
        nb_patches_h = tgt_sizes[batch_idx][0]
        nb_patches_w = tgt_sizes[batch_idx][1]
        fractional_coords_h = torch.arange(0, 1 - 1e-6, 1 / nb_patches_h)
        fractional_coords_w = torch.arange(0, 1 - 1e-6, 1 / nb_patches_w)
        bucket_coords_h = torch.bucketize(fractional_coords_h, boundaries, right=True)
        bucket_coords_w = torch.bucketize(fractional_coords_w, boundaries, right=True)
        out.append((bucket_coords_h[:, None] * num_patches_per_side + bucket_coords_w).flatten().numpy())
    return out


def test_position_ids_match_torch_bucketize():
    hw = [(h, w) for h in range(1, 101) for w in range(1, 101)]
    tgt = torch.tensor(hw, dtype=torch.int32)  # as get_vllm_embedding builds it
    ref_ids = _hf_position_ids(tgt)
    for (h, w), r in zip(hw, ref_ids):
        ours = pp.position_bucket_ids(h, w)
        assert ours.dtype == np.int64 and ours.shape == (h * w,)
        assert np.array_equal(ours, r), (h, w)
    # the same expression with Python ints (step is a double): a different result for some sizes
    bnd = torch.arange(1 / 70, 1.0, 1 / 70)
    for h in range(1, 101):
        for w in (1, 25, 49, 77, 100):
            bh = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / h), bnd, right=True)
            bw = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / w), bnd, right=True)
            assert np.array_equal(pp.position_bucket_ids(h, w, step_dtype="float64"),
                                  (bh[:, None] * 70 + bw).flatten().numpy()), (h, w)
    print(f"\n[b] position ids identical to torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}) for {len(hw)} (h, w) pairs")


def test_position_ids_large_and_not_floor():
    for nb in list(range(101, 400)) + [449, 512, 700, 1000, 2024, 5714]:
        t = torch.tensor([[nb, 1], [1, nb]], dtype=torch.int32)
        a, b = _hf_position_ids(t)
        assert np.array_equal(pp.position_bucket_ids(nb, 1), a), nb
        assert np.array_equal(pp.position_bucket_ids(1, nb), b), nb
    floor_differs = [nb for nb in range(1, 101)
                     if not np.array_equal(pp.position_bucket_ids(nb, 1), (70 * np.arange(nb)) // nb * 70)]
    print(f"\n[b] HF bucket ids differ from floor(70*i/nb) for nb in {floor_differs}")
    assert 25 in floor_differs and 32 not in floor_differs
    assert pp.position_bucket_ids(25, 1)[5] == 13 * 70  # floor would give 14


def test_v46_nearest_position_ids_match_transformers():
    """4.6 position ids against transformers' own `get_vision_nearest_position_ids`, one call per slice."""
    from transformers.vision_utils import get_vision_nearest_position_ids

    sizes = [(h, w) for h in range(1, 101) for w in (1, 2, 3, 5, 7, 8, 25, 32, 49, 64, 77, 100)]
    sizes += [(n, 1) for n in list(range(101, 400)) + [449, 512, 700, 1000, 2024]]
    for h, w in sizes:
        want = get_vision_nearest_position_ids(torch.tensor([[h, w]], dtype=torch.int32), 70).numpy()
        got = pp.vision_position_ids(h, w, 70, MODEL_FACTS["4.6"].vision_position_ids)
        assert got.dtype == np.int64 and np.array_equal(got, want), (h, w)
    differ = [n for n in range(1, 101) if not np.array_equal(pp.position_nearest_ids(n, 1), pp.position_bucket_ids(n, 1))]
    print(f"\n[b] 4.6 nearest ids identical to transformers for {len(sizes)} (h, w); they differ from the legacy "
          f"bucket ids for n in {differ}")
    assert differ, "the two rules should differ somewhere, else the 4.6 rule is not exercised"
    with pytest.raises(ValueError, match="position-id rule"):
        pp.vision_position_ids(2, 2, 70, "floor")


# ------------------------------------------------------------------------------------------------ (c)

def test_worked_examples():
    r = pp.preprocess_image(_noise(1344, 1344))
    assert r.grid == (3, 3)
    assert len(r.slices) == 10
    assert all(s.pixels.shape == (3, 448, 448) and s.tgt_size == (32, 32) for s in r.slices)
    assert [s.role for s in r.slices] == ["source"] + [(i, j) for i in range(3) for j in range(3)]

    r = pp.preprocess_image(_noise(224, 224))
    assert r.grid is None and len(r.slices) == 1
    assert r.slices[0].pixels.shape == (3, 448, 448) and r.slices[0].tgt_size == (32, 32)

    # banker's rounding: 455 / 14 = 32.5 -> 32 (C++ std::round would give 33 -> 462)
    assert pp.ensure_divide(455, 14) == 448 and pp.ensure_divide(469, 14) == 476
    assert pp.ensure_divide(5, 14) == 14 and pp.ensure_divide(0, 14) == 14
    # 300x310 is resized (allow_upscale) to 440x455 before alignment -> 434x448
    assert pp.find_best_resize((300, 310), S, 14, allow_upscale=True) == (434, 448)
    assert pp.preprocess_image(_noise(300, 310)).slices[0].pixels.shape == (3, 448, 434)

    # 1000x700: ratio 3.49 -> candidates 3, 4, 5 -> 2x2 (cols, rows); cells aligned to 14
    r = pp.preprocess_image(_noise(1000, 700))
    assert r.grid == (2, 2) and r.tgt_sizes.tolist() == [[27, 38]] * 5
    # wide image: grid is (cols, rows), cells row-major
    r = pp.preprocess_image(_noise(1792, 448))
    assert r.grid == (4, 1) and [s.role for s in r.slices[1:]] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert pp.get_sliced_grid((448, 1792), 9) == (1, 4)
    assert pp.get_sliced_grid((1344, 1344), 9, never_split=True) is None
    assert pp.get_sliced_grid((1344, 1344), 1) is None

    # normalisation: x/255 then (x - 0.5)/0.5, channels first
    img = Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8))
    np.testing.assert_array_equal(pp.normalize(img, (0.5,) * 3, (0.5,) * 3)[:, 0, 0],
                                  np.array([-1.0, 1.0, np.float32(51 / 255 - 0.5) / 0.5], np.float32))


def test_image_placeholder():
    from minicpmv_edge.runtime import prompt as pp      # prompt text: lives with the prompt code
    f = MODEL_FACTS["2.6"]
    pad = "<unk>" * 64
    one = pp.image_placeholder(None, 0, use_image_id=True, query_num=64, tokens=f.special_tokens)
    assert one == f"<image_id>0</image_id><image>{pad}</image>"
    assert pp.image_placeholder(None, 3, use_image_id=False, query_num=64, tokens=f.special_tokens) == \
        f"<image>{pad}</image>"
    text = pp.image_placeholder((3, 2), 1, use_image_id=True, query_num=64, tokens=f.special_tokens)
    row = f"<slice>{pad}</slice>" * 3
    assert text == f"<image_id>1</image_id><image>{pad}</image>{row}\n{row}"
    assert text.count("<unk>") == 64 * 7 and not text.endswith("\n")


# ------------------------------------------------------------------------------------------------ (d)

def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; Image.open reads the size without decoding anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b"")


def test_pixel_cap(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # let Pillow open the header; our cap must refuse
    huge = Image.open(io.BytesIO(_png_header_only(1, pp.DEFAULT_MAX_PIXELS + 1)))
    assert huge.size == (1, pp.DEFAULT_MAX_PIXELS + 1)
    with pytest.raises(ValueError, match=r"max_pixels=178,956,970"):
        pp.preprocess_image(huge)
    with pytest.raises(ValueError, match=r"max_pixels=1,000"):
        pp.preprocess_image(Image.new("L", (1, 1001)), max_pixels=1000)
    assert len(pp.preprocess_image(Image.new("L", (1, 1000)), max_pixels=1000).slices) == 1
    with pytest.raises(TypeError):
        pp.preprocess_image(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="unknown slicing"):
        pp.preprocess_image(Image.new("RGB", (4, 4)), slicing="anyres")
    with pytest.raises(ValueError, match="max_slice_nums"):
        pp.preprocess_image(Image.new("RGB", (4, 4)), max_slice_nums=0)


def _same(a: pp.PreprocessedImage, b: pp.PreprocessedImage) -> bool:
    return a.grid == b.grid and len(a.slices) == len(b.slices) and all(
        x.tgt_size == y.tgt_size and np.array_equal(x.pixels, y.pixels) for x, y in zip(a.slices, b.slices))


@pytest.mark.parametrize("mode", ["I;16", "CMYK", "RGBA", "P", "LA", "L", "1", "I", "F"])
def test_modes_convert_like_pil(mode):
    rng = np.random.default_rng(1)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (600, 500), dtype=np.uint16))
        assert img.mode == "I;16"
    elif mode == "CMYK":
        img = Image.fromarray(rng.integers(0, 256, (600, 500, 4), dtype=np.uint8), "CMYK")
    elif mode == "RGBA":
        a = rng.integers(0, 256, (600, 500, 4), dtype=np.uint8)
        a[:300, :, 3] = 0
        img = Image.fromarray(a, "RGBA")
    else:
        img = _noise(500, 600).convert(mode)
    assert img.mode == mode
    ours = pp.preprocess_image(img)
    assert _same(ours, pp.preprocess_image(img.convert("RGB")))
    assert ours.grid == (1, 2) and all(s.pixels.dtype == np.float32 for s in ours.slices)
    if mode == "RGBA":  # alpha dropped exactly like convert("RGB"), not composited over white
        assert not _same(ours, pp.preprocess_image(pp._to_rgb_composited(img)))


def test_exif_orientation():
    img = _noise(640, 360)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    jpeg = Image.open(io.BytesIO(buf.getvalue()))
    assert jpeg.size == (640, 360)
    r = pp.preprocess_image(jpeg)
    assert r.image_size == (360, 640)
    assert _same(r, pp.preprocess_image(ImageOps.exif_transpose(jpeg).convert("RGB")))


def test_module_is_torch_free():
    code = ("import sys; import minicpmv_edge.runtime.preprocess as p; "
            "p.preprocess_image(p.Image.new('RGB', (900, 300))); p.position_bucket_ids(25, 25); "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
