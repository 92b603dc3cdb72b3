"""Post-processes: evaluation attacks are deterministic for a seed; training ones pass gradients."""

from __future__ import annotations

import pytest
import torch

from trainer.data.images import image_dataset
from trainer.postprocess import (
    AUGMENT_OPS,
    EVAL_POSTPROCESSES,
    Augment,
    CropSearch,
    apply_postprocess,
    brightness,
    crop_resize,
    crop_window,
    gaussian_blur,
    jpeg,
    jpeg_approx,
    jpeg_hybrid,
    misaligned,
    quantize_8bit,
    uncrop,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def images() -> dict[int, torch.Tensor]:
    rgb = image_dataset("shapes", 32, 3, train=True, seed=0)
    gray = image_dataset("digits", 32, 1, train=True, seed=0)
    return {3: torch.stack([rgb[i][0] for i in range(8)]), 1: torch.stack([gray[i][0] for i in range(8)])}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["clean", *EVAL_POSTPROCESSES])
def test_eval_postprocess_deterministic(images, name, channels):
    x = images[channels]
    a = apply_postprocess(name, x, seed=5)
    b = apply_postprocess(name, x, seed=5)
    assert torch.equal(a, b)
    assert a.shape == x.shape and 0 <= float(a.min()) and float(a.max()) <= 1
    assert torch.equal(a, quantize_8bit(a))  # outputs are 8-bit images
    if name != "clean":
        assert not torch.equal(a, quantize_8bit(x))  # it did something


@pytest.mark.parametrize("name", ["noise", "crop", "brightness"])
def test_random_postprocesses_depend_on_seed(images, name):
    x = images[3]
    assert not torch.equal(apply_postprocess(name, x, seed=1), apply_postprocess(name, x, seed=2))


def test_unknown_postprocess(images):
    with pytest.raises(KeyError):
        apply_postprocess("sepia", images[1])


def test_jpeg_quality_orders_error(images):
    x = quantize_8bit(images[3])
    errs = [(jpeg(x, q) - x).abs().mean().item() for q in (50, 75, 90)]
    assert errs[0] > errs[1] > errs[2] > 0


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_approximation_is_close_and_differentiable(images, channels):
    x = quantize_8bit(images[channels]).requires_grad_(True)
    real = jpeg(x, 50)
    approx = jpeg_approx(x, 50.0)
    # Close to libjpeg: its error is a fraction of what JPEG itself changes (not bit-exact:
    # rounding and chroma resampling at the borders differ).
    assert (approx - real).abs().mean() < 0.35 * (real - x.detach()).abs().mean()
    approx.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    x.grad = None
    hyb = jpeg_hybrid(x, 50)
    assert torch.allclose(hyb, real)  # forward is the real JPEG
    hyb.sum().backward()
    assert x.grad.abs().sum() > 0  # backward is the approximation's


def test_blur_keeps_constants_and_smooths(images):
    c = torch.full((2, 3, 16, 16), 0.4)
    assert torch.allclose(gaussian_blur(c, 1.0, 5), c, atol=1e-6)
    x = images[1]
    y = gaussian_blur(x, 1.0, 5)
    dx = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()  # noqa: E731
    assert dx(y) < dx(x)
    assert torch.allclose(y.mean(), x.mean(), atol=0.01)  # blur moves, not removes, intensity


def test_crop_resize_full_ratio_is_identity_and_crop_zooms():
    x = torch.rand(3, 1, 20, 20)
    assert torch.allclose(crop_resize(x, 1.0), x, atol=1e-5)
    # A horizontal ramp: after an 80% crop each output pixel spans 0.8 input pixels.
    ramp = torch.linspace(0, 1, 40).view(1, 1, 1, 40).expand(1, 1, 40, 40).contiguous()
    y = crop_resize(ramp, 0.8, torch.Generator().manual_seed(0))
    slope = (y[0, 0, 20, 30] - y[0, 0, 20, 10]) / 20
    assert abs(float(slope) - (1 / 39) * 0.8) < 1e-3


def test_uncrop_undoes_a_crop_inside_its_window_and_fills_the_rest_neutrally():
    ramp = torch.linspace(0, 1, 32)
    x = (ramp.view(1, 1, 1, 32) * ramp.view(1, 1, 32, 1) + 0.1).expand(3, 1, 32, 32).contiguous()
    shift = torch.tensor([[0.1, -0.15], [0.0, 0.2], [-0.2, -0.2]])
    cropped = crop_window(x, 0.8, shift)
    y = uncrop(cropped, 0.8, shift)
    for i, (sx, sy) in enumerate(shift.tolist()):
        # The window spans normalised [s - 0.8, s + 0.8]: pixels (1 + s -/+ 0.8) * 16.
        x0, x1 = round((1 + sx - 0.8) * 16), round((1 + sx + 0.8) * 16)
        y0, y1 = round((1 + sy - 0.8) * 16), round((1 + sy + 0.8) * 16)
        assert torch.allclose(y[i, :, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1], x[i, :, y0 + 1 : y1 - 1, x0 + 1 : x1 - 1], atol=1e-5)
        outside = torch.ones(32, 32, dtype=torch.bool)
        outside[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = False
        # Thrown away by the crop: the cropped image's mean, flat.
        assert torch.allclose(y[i, 0][outside], cropped[i].mean().expand(int(outside.sum())), atol=1e-6)
    # The wrong window does not give the image back.
    assert not torch.allclose(uncrop(crop_window(x, 0.8, shift), 0.8, -shift)[:, :, 8:24, 8:24], x[:, :, 8:24, 8:24], atol=0.02)


def test_crop_search_grid_covers_every_window_within_its_jitter():
    search = CropSearch(ratios=(0.8, 0.9), step=0.05)
    c = search.candidates()
    assert c[0].tolist() == [1.0, 0.0, 0.0]
    # 0.8: centres -0.2..0.2 (9 per axis); 0.9: -0.1..0.1 (5 per axis).
    assert len(c) == 1 + 81 + 25
    assert (c[:, 1:].abs() <= (1 - c[:, :1]) + 1e-6).all()  # every window inside the image
    jr, js = search.jitter
    assert jr == pytest.approx(0.05) and js == pytest.approx(0.025)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # any 0.8 crop has a candidate within the jitter
        s = (2 * torch.rand(2, generator=g) - 1) * 0.2
        near = c[(c[:, 0] == 0.8)][:, 1:]
        assert ((near - s).abs().max(1).values <= js + 1e-6).any()


def test_misaligned_views_are_wrong_crops():
    x = torch.rand(6, 1, 32, 32)
    search = CropSearch()
    y = misaligned(x, search, torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    # The first half is undone from a crop that never happened: a flat border at the mean.
    flat = [(y[i] == y[i, 0, 0, 0]).float().mean().item() for i in range(3)] + [(y[i] == y[i, 0, -1, -1]).float().mean().item() for i in range(3)]
    assert max(flat[0], flat[3]) > 0.1 and max(flat[1], flat[4]) > 0.1 and max(flat[2], flat[5]) > 0.1
    # The second half is cropped and left zoomed: not the image.
    assert not torch.allclose(y[3:], x[3:], atol=0.05)


def test_brightness_scales_and_clips():
    x = torch.tensor([0.2, 0.5, 0.9]).view(1, 1, 1, 3)
    assert torch.allclose(brightness(x, 1.5), torch.tensor([0.3, 0.75, 1.0]).view(1, 1, 1, 3))


@pytest.mark.parametrize("op", AUGMENT_OPS[1:])
def test_augment_ops_pass_gradients(images, op):
    aug = Augment(strength=1.0, p=1.0, ops=[op])
    x = images[3].clone().requires_grad_(True)
    y = aug(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    (y * torch.linspace(0, 1, y.numel()).view_as(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_augment_deterministic_with_generator_and_off_at_zero(images):
    aug = Augment(strength=1.0, p=0.9)
    x = images[3]
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, quantize_8bit(x))
    assert torch.equal(Augment(strength=0.0)(x), quantize_8bit(x))
    with pytest.raises(ValueError):
        Augment(ops=["sepia"])


def test_recrop_undoes_the_crop_up_to_the_search_jitter():
    ramp = torch.linspace(0, 1, 32)
    x = (ramp.view(1, 1, 1, 32) * 0.7 + ramp.view(1, 1, 32, 1) * 0.3).expand(64, 1, 32, 32).contiguous()
    g = torch.Generator().manual_seed(2)
    recropped = Augment(p=1.0, ops=["recrop"])(x, g)
    cropped = Augment(p=1.0, ops=["crop"])(x, torch.Generator().manual_seed(2))
    centre = (slice(None), slice(None), slice(12, 20), slice(12, 20))
    # A recrop sits (almost) where the image was; a plain crop is zoomed and moved.
    assert (recropped - x)[centre].abs().mean() < 0.5 * (cropped - x)[centre].abs().mean()
    assert (recropped - x)[centre].abs().mean() < 0.03
