"""Image post-processes: evaluation attacks and training augmentations.

All functions take and return float batches ``(N, C, H, W)`` in [0, 1] (C = 1 or 3).
Randomness only ever comes from an explicit ``torch.Generator`` (or from the global RNG in
the training augmentation), so an evaluation post-process is a pure function of its input
and its seed.

Evaluation (``EVAL_POSTPROCESSES``, ``apply_postprocess``) uses real JPEG through PIL.
Training (``Augment``) needs gradients: JPEG is then either a differentiable approximation
(8x8 DCT, the IJG quantisation tables, a cubic soft rounding, after Shin & Song 2017), or a
"hybrid" whose forward pass is the real PIL JPEG and whose backward pass is that of the
approximation (straight-through), so the decoder trains on exactly what it will be tested on.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

Tensor = torch.Tensor

# ---------------------------------------------------------------------------- helpers


def quantize_8bit(x: Tensor) -> Tensor:
    """Round to the 256 levels an 8-bit image file holds (no gradient)."""
    return (x.clamp(0, 1) * 255).round() / 255


def _ste(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass."""
    return surrogate + (value - surrogate).detach()


def clamp01_ste(x: Tensor) -> Tensor:
    """Clamp to [0, 1] with an identity gradient, so saturated pixels still pass gradients."""
    return _ste(x.clamp(0, 1), x)


def _per_sample(v: float | Tensor, n: int, like: Tensor) -> Tensor:
    """A scalar or an ``(N,)`` tensor as an ``(N, 1, 1, 1)`` tensor on ``like``'s device."""
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return t.expand(n).reshape(n, 1, 1, 1) if t.ndim == 0 else t.reshape(n, 1, 1, 1)


# ---------------------------------------------------------------------------- JPEG


def jpeg(x: Tensor, quality: int | Sequence[int]) -> Tensor:
    """Real JPEG through PIL (libjpeg, 4:2:0 chroma for RGB) at ``quality``; no gradient.

    ``quality`` is one int or one per image. libjpeg is deterministic, so no seed is needed.
    """
    n = x.shape[0]
    qs = [int(quality)] * n if isinstance(quality, int | np.integer) else [int(q) for q in quality]
    arr = quantize_8bit(x.detach()).mul(255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arr)
    for i in range(n):
        img = Image.fromarray(arr[i, :, :, 0] if arr.shape[-1] == 1 else arr[i], "L" if arr.shape[-1] == 1 else "RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=qs[i])
        buf.seek(0)
        dec = np.asarray(Image.open(buf))
        out[i] = dec[..., None] if dec.ndim == 2 else dec
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255


_LUMA_TABLE = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)
_CHROMA_TABLE = torch.full((8, 8), 99.0)
_CHROMA_TABLE[:4, :4] = torch.tensor(
    [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]], dtype=torch.float32
)


def _dct_matrix(device, dtype) -> Tensor:
    k = torch.arange(8, dtype=torch.float64)[:, None]
    n = torch.arange(8, dtype=torch.float64)[None, :]
    d = torch.cos((2 * n + 1) * k * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d.to(device, dtype)


def _quant_tables(base: Tensor, quality: Tensor) -> Tensor:
    """IJG quality scaling of a base table, one table per image: ``(N, 8, 8)``."""
    q = quality.clamp(1, 100)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)
    return ((base[None] * scale[:, None, None] + 50) / 100).floor().clamp(1, 255)


def soft_round(x: Tensor) -> Tensor:
    """Rounding whose gradient is not zero almost everywhere: round(x) + (x - round(x))^3."""
    r = torch.round(x)
    return r + (x - r) ** 3


def _jpeg_plane(p: Tensor, tables: Tensor) -> Tensor:
    """DCT-quantise-dequantise one plane ``(N, H, W)`` of level-shifted values in 8x8 blocks."""
    n, h, w = p.shape
    ph, pw = (-h) % 8, (-w) % 8
    if ph or pw:  # libjpeg pads partial blocks by repeating the edge
        p = F.pad(p[:, None], (0, pw, 0, ph), mode="replicate")[:, 0]
    hh, ww = p.shape[1] // 8, p.shape[2] // 8
    blocks = p.reshape(n, hh, 8, ww, 8).permute(0, 1, 3, 2, 4)
    d = _dct_matrix(p.device, p.dtype)
    coef = d @ blocks @ d.T
    q = tables.to(p.device, p.dtype)[:, None, None]
    coef = soft_round(coef / q) * q
    blocks = d.T @ coef @ d
    return blocks.permute(0, 1, 3, 2, 4).reshape(n, hh * 8, ww * 8)[:, :h, :w]


def jpeg_approx(x: Tensor, quality: float | Tensor) -> Tensor:
    """Differentiable JPEG: YCbCr, 2x2 chroma subsampling, 8x8 DCT, IJG tables, soft rounding.

    Close to libjpeg but not bit-exact (chroma upsampling and final rounding differ).
    """
    n, c = x.shape[:2]
    qual = torch.as_tensor(quality, dtype=torch.float32, device=x.device).expand(n)
    luma_t = _quant_tables(_LUMA_TABLE.to(x.device), qual)
    v = x * 255
    if c == 1:
        return (_jpeg_plane(v[:, 0] - 128, luma_t) + 128)[:, None].div(255).clamp(0, 1)
    r, g, b = v[:, 0], v[:, 1], v[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    y = _jpeg_plane(y - 128, luma_t) + 128
    chroma_t = _quant_tables(_CHROMA_TABLE.to(x.device), qual)
    h, w = x.shape[-2:]
    sub = F.avg_pool2d(torch.stack([cb, cr], 1), 2, ceil_mode=True)
    sub = torch.stack([_jpeg_plane(sub[:, 0], chroma_t), _jpeg_plane(sub[:, 1], chroma_t)], 1)
    cb, cr = F.interpolate(sub, scale_factor=2, mode="bilinear", align_corners=False)[..., :h, :w].unbind(1)
    out = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return (out / 255).clamp(0, 1)


def jpeg_hybrid(x: Tensor, quality: int | Sequence[int]) -> Tensor:
    """Real JPEG forward, the differentiable approximation's gradient backward."""
    q = torch.as_tensor(quality, dtype=torch.float32, device=x.device)
    return _ste(jpeg(x, quality), jpeg_approx(x, q))


# ---------------------------------------------------------------------------- other processes


def gaussian_blur(x: Tensor, sigma: float | Tensor, kernel_size: int | None = None) -> Tensor:
    """Separable Gaussian blur with reflect padding; ``sigma`` scalar or one per image.

    The kernel has ``kernel_size`` taps (default ``2 * ceil(2 * max sigma) + 1``).
    """
    n, c, h, w = x.shape
    sig = _per_sample(sigma, n, x).reshape(n).clamp_min(1e-3)
    if kernel_size is None:
        kernel_size = 2 * math.ceil(2 * float(sig.max())) + 1
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t[None] ** 2) / (2 * sig[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, K)
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (r, r, r, r), mode="reflect" if min(h, w) > r else "replicate")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    return y.reshape(n, c, h, w)


def gaussian_noise(x: Tensor, std: float | Tensor, generator: torch.Generator | None = None, clamp: bool = True) -> Tensor:
    """Add N(0, std^2) noise (``std`` scalar or per image), then clip to [0, 1] if ``clamp``."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    y = x + noise * _per_sample(std, x.shape[0], x)
    return y.clamp(0, 1) if clamp else y


def _window_theta(ratio: Tensor, shift: Tensor) -> Tensor:
    """The affine map (normalised coordinates) from an output pixel to its place in the
    ``ratio`` x ``ratio`` window centred at ``shift``: ``(N, 2, 3)``."""
    n = ratio.shape[0]
    theta = torch.zeros(n, 2, 3, dtype=ratio.dtype, device=ratio.device)
    theta[:, 0, 0] = ratio
    theta[:, 1, 1] = ratio
    theta[:, :, 2] = shift
    return theta


def _resample(x: Tensor, theta: Tensor, padding_mode: str) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def crop_window(x: Tensor, ratio: float | Tensor, shift: Tensor) -> Tensor:
    """Crop the ``ratio`` x ``ratio`` window centred at ``shift`` and resize it back (bilinear).

    ``shift`` is ``(N, 2)`` (x, y) in normalised coordinates: the window stays inside the image
    for ``|shift| <= 1 - ratio``. One affine ``grid_sample``: differentiable, vectorised.
    """
    n = x.shape[0]
    r = _per_sample(ratio, n, x).reshape(n)
    return _resample(x, _window_theta(r, shift.to(x.device, x.dtype)), "border")


def uncrop(x: Tensor, ratio: float | Tensor, shift: Tensor) -> Tensor:
    """The inverse of :func:`crop_window`: shrink ``x`` by ``ratio`` and put it back where its
    window was; the rest of the frame, which the crop threw away, is the image's mean (a
    neutral fill: no edge, no pattern for a reader to mistake for a mark).

    ``uncrop(crop_window(x, r, s), r, s)`` is ``x`` inside the window (up to resampling blur).
    """
    n = x.shape[0]
    r = _per_sample(ratio, n, x).reshape(n)
    inv_r = 1 / r
    theta = _window_theta(inv_r, -shift.to(x.device, x.dtype) * inv_r[:, None])
    mean = x.mean((1, 2, 3), keepdim=True)
    return mean + _resample(x - mean, theta, "zeros")


def random_shift(ratio: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random window centre ``(N, 2)`` that keeps each ``ratio`` window inside."""
    u = torch.rand((ratio.shape[0], 2), generator=generator, dtype=ratio.dtype, device="cpu").to(ratio.device)
    return (2 * u - 1) * (1 - ratio)[:, None]


def crop_resize(x: Tensor, ratio: float | Tensor = 0.8, generator: torch.Generator | None = None) -> Tensor:
    """Crop a ``ratio`` x ``ratio`` window at a random place and resize it back (bilinear)."""
    r = _per_sample(ratio, x.shape[0], x).reshape(-1)
    return crop_window(x, r, random_shift(r, generator))


@dataclass(frozen=True)
class CropSearch:
    """The crops a fingerprint decoder tries to undo before reading (WOUAF's crop search).

    A decoder cannot tell whether an image was cropped and resized, nor where. So it tries
    every candidate window (``ratio``, centre) on a grid, undoes it with :func:`uncrop`, reads
    the bits, and keeps the reading it is most confident of (``identity``, no crop, is always
    a candidate). Training shows the decoder crops undone with at most the error this grid
    leaves (``jitter``), and wrongly undone ones with a target of "no opinion".
    """

    #: Window sides tried, as fractions of the image side (1.0, no crop, is always tried).
    ratios: tuple[float, ...] = (0.75, 0.85, 0.95)
    #: Spacing of the window centres tried, in normalised coordinates (2 = the image side;
    #: 0.1 is 1.6 pixels of a 32-pixel image). Every candidate is one decoder pass per image,
    #: so the grid is coarse (36 candidates) and the decoder learns to tolerate its error.
    step: float = 0.1

    @property
    def jitter(self) -> tuple[float, float]:
        """Largest error (ratio, centre) between a crop and the nearest candidate."""
        spacing = min((b - a for a, b in zip(self.ratios, self.ratios[1:], strict=False)), default=2 * (1 - self.ratios[0]))
        return spacing / 2, self.step / 2

    def candidates(self) -> Tensor:
        """``(K, 3)``: ratio, centre x, centre y of every candidate; row 0 is the identity."""
        rows = [(1.0, 0.0, 0.0)]
        for r in self.ratios:
            k = int((1 - r) / self.step + 1e-6)  # centres keep the window inside the image
            centres = [i * self.step for i in range(-k, k + 1)]
            rows += [(r, cx, cy) for cy in centres for cx in centres]
        return torch.tensor(rows, dtype=torch.float32)


#: The search ``switchml-train attribution --crop-search`` trains for and decodes with.
DEFAULT_CROP_SEARCH = CropSearch()


def brightness(x: Tensor, factor: float | Tensor, clamp: bool = True) -> Tensor:
    """Multiply by ``factor`` (scalar or per image), as torchvision's adjust_brightness; clip."""
    y = x * _per_sample(factor, x.shape[0], x)
    return y.clamp(0, 1) if clamp else y


# ---------------------------------------------------------------------------- evaluation set

#: Parameters of the evaluation post-processes (reported beside the results).
EVAL_PARAMS = {
    "jpeg50": {"quality": 50},
    "jpeg75": {"quality": 75},
    "jpeg90": {"quality": 90},
    "blur": {"sigma": 1.0, "kernel_size": 5},
    "noise": {"std": 0.05},
    "crop": {"ratio": 0.8},
    "brightness": {"factor_min": 0.7, "factor_max": 1.3},
}


def _eval_brightness(x: Tensor, g: torch.Generator) -> Tensor:
    p = EVAL_PARAMS["brightness"]
    f = p["factor_min"] + (p["factor_max"] - p["factor_min"]) * torch.rand(x.shape[0], generator=g)
    return brightness(x, f.to(x.device, x.dtype))


EVAL_POSTPROCESSES: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "jpeg50": lambda x, g: jpeg(x, 50),
    "jpeg75": lambda x, g: jpeg(x, 75),
    "jpeg90": lambda x, g: jpeg(x, 90),
    "blur": lambda x, g: gaussian_blur(x, EVAL_PARAMS["blur"]["sigma"], EVAL_PARAMS["blur"]["kernel_size"]),
    "noise": lambda x, g: gaussian_noise(x, EVAL_PARAMS["noise"]["std"], g),
    "crop": lambda x, g: crop_resize(x, EVAL_PARAMS["crop"]["ratio"], g),
    "brightness": _eval_brightness,
}


def apply_postprocess(name: str, x: Tensor, seed: int = 0) -> Tensor:
    """Apply evaluation post-process ``name`` (or ``"clean"``) and round to 8 bits.

    Deterministic: the same ``x``, ``name`` and ``seed`` give the same output.
    """
    if name == "clean":
        return quantize_8bit(x)
    if name not in EVAL_POSTPROCESSES:
        raise KeyError(f"unknown post-process {name!r}; known: clean, {', '.join(EVAL_POSTPROCESSES)}")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return quantize_8bit(EVAL_POSTPROCESSES[name](x, g))


# ---------------------------------------------------------------------------- training augmentation

AUGMENT_OPS = ("identity", "jpeg", "blur", "noise", "crop", "recrop", "brightness")
#: What ``Augment`` draws from by default: every operation but ``recrop``, which only makes
#: sense for a reader that searches crops (``CropSearch``).
DEFAULT_AUGMENT_OPS = ("jpeg", "blur", "noise", "crop", "brightness")


def misaligned(x: Tensor, search: CropSearch, generator: torch.Generator | None = None) -> Tensor:
    """``x`` as a crop search's *wrong* candidates show it: half the batch undone from a crop
    that never happened, half cropped and not undone (at ratios of the search's lower half,
    at least two grid steps from right)."""
    n = x.shape[0]
    lo = min(search.ratios)
    r = (lo + (0.85 - lo) * torch.rand(n, generator=generator)).to(x.device, x.dtype)
    shift = random_shift(r, generator)
    first = torch.arange(n, device=x.device) < n // 2
    return torch.where(first[:, None, None, None], uncrop(x, r, shift), crop_window(x, r, shift))


class Augment(nn.Module):
    """Random differentiable post-processing, one operation per image, for robust training.

    At ``strength`` s (1 = the default ranges, which cover the evaluation settings with some
    margin): JPEG quality in [95 - 55 s, 95], blur sigma in [0.3, 1.3 s], noise std in
    [0, 0.07 s], crop ratio in [1 - 0.25 s, 1], brightness factor in [1 - 0.4 s, 1 + 0.4 s].
    ``recrop`` crops like ``crop`` and then undoes the crop as ``crop_search`` would, with the
    error its grid leaves (``CropSearch.jitter``): what a searching decoder reads.
    With probability ``1 - p`` an image is left as it is. ``jpeg_mode`` is ``"hybrid"`` (real
    JPEG forward, approximation backward), ``"approx"`` or ``"real"`` (identity gradient).
    Outputs are rounded to 8 bits straight-through, as saved images are.
    """

    def __init__(
        self,
        strength: float = 1.0,
        p: float = 0.85,
        ops: Sequence[str] = DEFAULT_AUGMENT_OPS,
        jpeg_mode: str = "hybrid",
        crop_search: CropSearch = DEFAULT_CROP_SEARCH,
    ):
        super().__init__()
        unknown = set(ops) - set(AUGMENT_OPS)
        if unknown:
            raise ValueError(f"unknown augmentations {sorted(unknown)}")
        if jpeg_mode not in ("hybrid", "approx", "real"):
            raise ValueError(f"jpeg_mode must be hybrid, approx or real, not {jpeg_mode!r}")
        self.strength = float(strength)
        self.p = float(p)
        self.ops = tuple(o for o in ops if o != "identity")
        self.jpeg_mode = jpeg_mode
        self.crop_search = crop_search

    def extra_repr(self) -> str:
        return f"strength={self.strength}, p={self.p}, ops={self.ops}, jpeg_mode={self.jpeg_mode}"

    def _uniform(self, n: int, lo: float, hi: float, like: Tensor, g: torch.Generator | None) -> Tensor:
        return (lo + (hi - lo) * torch.rand(n, generator=g)).to(like.device, like.dtype)

    def apply_op(self, op: str, x: Tensor, g: torch.Generator | None = None) -> Tensor:
        """Apply one operation with random strength to every image of ``x``."""
        n, s = x.shape[0], self.strength
        if op == "identity" or s <= 0:
            return x
        if op == "jpeg":
            q = torch.randint(round(95 - 55 * min(s, 1.5)), 96, (n,), generator=g)
            if self.jpeg_mode == "approx":
                return jpeg_approx(x, q.float().to(x.device))
            if self.jpeg_mode == "real":
                return _ste(jpeg(x, q.tolist()), x)
            return jpeg_hybrid(x, q.tolist())
        if op == "blur":
            return gaussian_blur(x, self._uniform(n, 0.3, max(0.3, 1.3 * s), x, g))
        if op == "noise":
            return clamp01_ste(gaussian_noise(x, self._uniform(n, 0.0, 0.07 * s, x, g), g, clamp=False))
        if op == "crop":
            return crop_resize(x, self._uniform(n, max(0.5, 1 - 0.25 * s), 1.0, x, g), g)
        if op == "recrop":
            r = self._uniform(n, max(0.5, 1 - 0.25 * s), 1.0, x, g)
            shift = random_shift(r, g)
            jr, js = self.crop_search.jitter
            # The search's nearest candidate: off by up to half a grid step; the identity
            # (no undoing) for the mildest crops.
            r_found = (r + self._uniform(n, -jr, jr, x, g)).clamp(max=1.0)
            shift_found = shift + (self._uniform(2 * n, -js, js, x, g)).view(n, 2)
            undone = uncrop(crop_window(x, r, shift), r_found, shift_found)
            mild = (r >= 1 - jr)[:, None, None, None]
            return torch.where(mild, crop_window(x, r, shift), undone)
        if op == "brightness":
            return clamp01_ste(brightness(x, self._uniform(n, 1 - 0.4 * s, 1 + 0.4 * s, x, g), clamp=False))
        raise ValueError(op)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n = x.shape[0]
        if not self.ops or self.p <= 0:
            return _ste(quantize_8bit(x), x)
        # Each image draws an operation (or none); images that share one are processed together.
        choice = torch.randint(len(self.ops), (n,), generator=generator)
        choice[torch.rand(n, generator=generator) >= self.p] = -1
        pieces, order = [], []
        for k in choice.unique().tolist():
            idx = (choice == k).nonzero().flatten()
            sub = x[idx.to(x.device)]
            pieces.append(sub if k < 0 else self.apply_op(self.ops[k], sub, generator))
            order.append(idx)
        out = torch.cat(pieces)[torch.argsort(torch.cat(order)).to(x.device)]
        return _ste(quantize_8bit(out), out)
