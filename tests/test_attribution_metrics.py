"""Attribution metrics on cases whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.eval.attribution_metrics import (
    attribute,
    attribution_accuracy,
    bit_accuracy,
    frechet_distance,
    hamming_distances,
    psnr,
    random_fingerprints,
    save_grid,
    ssim,
)

torch.set_num_threads(1)


def test_bit_accuracy_known_answers():
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 2, (2000, 32), generator=g)
    assert bit_accuracy(true, true) == 1.0  # a decoder that outputs the true bits
    assert bit_accuracy(1 - true, true) == 0.0
    rand = torch.randint(0, 2, (2000, 32), generator=g)
    assert abs(bit_accuracy(rand, true) - 0.5) < 0.01  # 64,000 coin flips: sd 0.002
    with pytest.raises(ValueError):
        bit_accuracy(true[:, :8], true)


def test_fingerprint_pool_is_distinct_and_seeded():
    a = random_fingerprints(1000, 32, seed=3)
    assert a.shape == (1000, 32) and len(torch.unique(a, dim=0)) == 1000
    assert torch.equal(a, random_fingerprints(1000, 32, seed=3))
    small = random_fingerprints(16, 4, seed=0)  # every 4-bit code, each once
    assert len(torch.unique(small, dim=0)) == 16
    with pytest.raises(ValueError):
        random_fingerprints(17, 4)


def test_attribution_known_answers():
    pool = random_fingerprints(1000, 32, seed=1)
    users = torch.randperm(1000, generator=torch.Generator().manual_seed(2))[:500]
    exact = pool[users]
    assert attribution_accuracy(exact, users, pool) == 1.0
    # One flipped bit per image: another user within Hamming distance 2 of a given one has
    # probability ~1e-4 among 1,000 random 32-bit codes, so attribution still holds.
    flipped = exact.clone()
    flipped[torch.arange(500), torch.randint(0, 32, (500,))] ^= 1
    assert attribution_accuracy(flipped, users, pool) == 1.0
    # Random bits: right by chance about 1 time in 1,000.
    rand = torch.randint(0, 2, (500, 32), dtype=torch.uint8)
    assert attribution_accuracy(rand, users, pool) < 0.02


def test_hamming_and_ties_count_as_misses():
    pool = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.uint8)
    bits = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.uint8)
    assert hamming_distances(bits, pool).tolist() == [[0, 2], [1, 1], [3, 1]]
    assert attribute(bits, pool).tolist() == [0, -1, 1]


def test_psnr_known_answers():
    x = torch.rand(4, 3, 16, 16)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()  # identical: +inf
    y = (x + 0.1).clamp(max=2)  # uniform error 0.1 -> MSE 0.01 -> 20 dB
    assert torch.allclose(psnr(x, y), torch.full((4,), 20.0, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(psnr(x, x + 0.01), torch.full((4,), 40.0, dtype=torch.float64), atol=1e-6)


def test_ssim_known_answers():
    x = torch.rand(3, 1, 16, 16)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64), atol=1e-12)  # identical: 1
    # Constant images a and b: the structure terms are 1, SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.3, 0.6, 0.01**2
    s = ssim(torch.full((1, 1, 12, 12), a), torch.full((1, 1, 12, 12), b))
    assert s.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    # An inverted image: the correlation term turns negative.
    assert ssim(x, 1 - x).mean() < 0
    noisy = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    s_noisy = ssim(x, noisy)
    assert (s_noisy < 1).all() and (s_noisy > 0.5).all()
    assert torch.allclose(s_noisy, ssim(noisy, x))  # symmetric
    # Works on images smaller than the 11-tap window, and on colour.
    assert ssim(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)).shape == (2,)


def test_frechet_distance_known_answers():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.array([1.0, 2.0, 0.0, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-6)  # |mu diff|^2
    # N(0, I) vs N(0, 4 I) in 4 dimensions: Tr(I + 4I - 2 * 2I) = 4.
    b = 2 * rng.standard_normal((20000, 4))
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)


def test_grid_png(tmp_path):
    root = torch.rand(4, 1, 16, 16)
    bits = torch.randint(0, 2, (4, 32), dtype=torch.uint8)
    p = save_grid(tmp_path / "g.png", root, (root + 0.02).clamp(0, 1), bits, bits, baseline=root)
    assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
