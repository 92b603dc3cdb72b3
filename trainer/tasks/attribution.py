"""Attributable generative models: a root generator, WOUAF fingerprinting, and a key baseline.

Three stages, run in order by ``--stage all`` or one at a time:

root
    A small convolutional VAE trained on the data. Its decoder is the *root generator*
    ``G0(z)``, ``z ~ N(0, I)``. ``finish`` writes ``root_generator.pt``.
wouaf
    WOUAF (Kim et al. 2023). A mapping network turns a fingerprint ``f`` in {0,1}^bits into one
    scale per input channel of every convolution of a frozen copy of ``G0``; the scaled
    weights are demodulated (StyleGAN2) *relative to the root weights*, so that all-ones
    scales give back ``G0`` (up to float rounding). A fingerprint decoder CNN reads ``f`` back from the image.
    Both are trained together: BCE on the bits (clean and after a random post-process) plus a
    quality loss against ``G0(z)``. ``finish`` writes ``wouaf_model.pt``.
baseline
    Decentralized attribution (Kim, Ren, Yang 2020). ``--users`` keys ``phi_k``: unit vectors
    in image space, data-compliant (``phi_k . x <= -1`` for root outputs ``x`` in [-1, 1]) and
    mutually orthogonal. User model ``G_k`` (fine-tuned from ``G0``) minimises
    ``max(0, margin - phi_k . G_k(z)) + gamma * ||G_k(z) - G0(z)||^2``; an image is attributed
    to the key with the largest score if that score is positive. ``finish`` writes
    ``baseline_models.pt``.

The trainer wraps each stage's ``build_model`` result in DDP and calls ``loss`` with the
wrapped module; every stage therefore does all its trainable work in one ``forward`` call.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from trainer.data.images import image_dataset
from trainer.postprocess import Augment, apply_postprocess
from trainer.tasks.base import Stage, StageContext, Task

log = logging.getLogger(__name__)

Tensor = torch.Tensor

ROOT_FILE = "root_generator.pt"
# Not "<stage>.pt": those are the trainer's per-stage checkpoints (model, optimiser, step).
WOUAF_FILE = "wouaf_model.pt"
BASELINE_FILE = "baseline_models.pt"


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or similar) wrapper."""
    return getattr(model, "module", model)


def _float_metrics(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in d.items()}


def psnr_from_mse(mse: float | Tensor, cap: float | None = None) -> float:
    """PSNR in dB of images in [0, 1] with mean squared error ``mse`` (inf for 0, or ``cap``)."""
    m = float(mse.detach()) if isinstance(mse, Tensor) else float(mse)
    p = math.inf if m <= 0 else -10.0 * math.log10(m)
    return min(p, cap) if cap is not None else p


#: Training metrics cap PSNR here, so that a step with an unchanged image (the first,
#: say) does not turn an average of logged values into infinity.
PSNR_LOG_CAP = 100.0


# =========================================================================== models


class ModConv2d(nn.Module):
    """A 3x3 convolution whose input channels can be scaled per sample (weight modulation).

    With style ``s`` (B, in): ``w'[b,o,i] = w[o,i] * s[b,i]``, then demodulated so that every
    output filter keeps the root filter's norm: ``w''[b,o] = w'[b,o] * |w[o]| / |w'[b,o]|``.
    StyleGAN2 normalises to unit norm; normalising to the root's norm instead makes ``s = 1``
    reproduce the (plainly trained) root layer, up to float rounding. It is computed as "scale the input,
    convolve with the shared weight, scale the output" (StyleGAN2's non-fused form), which is
    the same function and much cheaper than per-sample grouped convolutions on a CPU.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int = 3):
        super().__init__()
        conv = nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2)
        self.weight = conv.weight
        self.bias = conv.bias
        self.padding = kernel_size // 2
        self.in_channels = cin

    def forward(self, x: Tensor, style: Tensor | None = None) -> Tensor:
        if style is None:
            return F.conv2d(x, self.weight, self.bias, padding=self.padding)
        y = F.conv2d(x * style[:, :, None, None], self.weight, None, padding=self.padding)
        wsq = self.weight.pow(2).sum((2, 3))  # (out, in)
        norm0 = wsq.sum(1).add(1e-8).sqrt()  # (out,)
        norm = (style.pow(2) @ wsq.T).add(1e-8).sqrt()  # (B, out)
        return y * (norm0 / norm)[:, :, None, None] + self.bias[None, :, None, None]


def _n_levels(image_size: int) -> int:
    n = int(round(math.log2(image_size / 4)))
    if n < 1 or 4 * 2**n != image_size:
        raise ValueError(f"image size must be 4 * 2^k with k >= 1 (8, 16, 32, 64, ...), got {image_size}")
    return n


class Generator(nn.Module):
    """The decoder: ``z`` -> 4x4 features -> (upsample, modulable 3x3 conv) x k -> image in [0, 1].

    Every convolution also sees ``textures`` fixed random feature maps at its resolution
    (seeded buffers, StyleGAN's per-layer noise inputs made constant). The root trains with
    them like any input; they matter for fingerprinting: scaling an input channel that
    carries image content makes a content-dependent change, which is hard to read back,
    while scaling a texture channel adds a fixed pattern, an easy carrier for the bits.
    """

    def __init__(self, latent_dim: int = 16, channels: int = 1, image_size: int = 32, width: int = 64, textures: int = 8):
        super().__init__()
        n = _n_levels(image_size)
        chans = [width] + [max(16, width >> max(0, i)) for i in range(n)]  # e.g. 64, 64, 32, 16
        self.latent_dim, self.channels, self.image_size, self.width = latent_dim, channels, image_size, width
        self.textures = textures
        self.fc = nn.Linear(latent_dim, chans[0] * 16)
        self.convs = nn.ModuleList([ModConv2d(chans[i] + textures, chans[i + 1]) for i in range(n)])
        self.to_img = ModConv2d(chans[-1] + textures, channels)
        g = torch.Generator().manual_seed(1234)
        for i in range(n + 1):
            side = 8 * 2**i if i < n else image_size
            self.register_buffer(f"texture{i}", torch.randn(1, textures, side, side, generator=g))
        self._c0 = chans[0]

    @property
    def style_dims(self) -> list[int]:
        """Input channels of every modulable convolution, in order."""
        return [c.in_channels for c in self.convs] + [self.to_img.in_channels]

    @property
    def carriers(self) -> list[tuple[int, int]]:
        """(layer, input channel) of every texture input, coarsest layer first."""
        return [(layer, d - self.textures + t) for layer, d in enumerate(self.style_dims) for t in range(self.textures)]

    def config(self) -> dict[str, int]:
        return {
            "latent_dim": self.latent_dim, "channels": self.channels, "image_size": self.image_size,
            "width": self.width, "textures": self.textures,
        }  # fmt: skip

    def _with_texture(self, h: Tensor, i: int) -> Tensor:
        if not self.textures:
            return h
        t = getattr(self, f"texture{i}")
        return torch.cat([h, t.expand(h.shape[0], -1, -1, -1)], 1)

    def logits(self, z: Tensor, styles: list[Tensor] | None = None) -> Tensor:
        """Pre-sigmoid output; ``styles`` (one ``(B, in)`` tensor per conv) modulates the convs."""
        s = styles if styles is not None else [None] * (len(self.convs) + 1)
        h = F.leaky_relu(self.fc(z), 0.2).view(-1, self._c0, 4, 4)
        for i, (conv, st) in enumerate(zip(self.convs, s[:-1], strict=True)):
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = F.leaky_relu(conv(self._with_texture(h, i), st), 0.2)
        return self.to_img(self._with_texture(h, len(self.convs)), s[-1])

    def forward(self, z: Tensor, styles: list[Tensor] | None = None) -> Tensor:
        return torch.sigmoid(self.logits(z, styles))


class VAE(nn.Module):
    """A small convolutional VAE; its decoder is the root generator."""

    def __init__(self, latent_dim: int = 16, channels: int = 1, image_size: int = 32, width: int = 64, textures: int = 8):
        super().__init__()
        n = _n_levels(image_size)
        layers: list[nn.Module] = []
        c = channels
        for i in range(n):
            c2 = min(4 * width, 32 * 2**i)
            layers += [nn.Conv2d(c, c2, 4, 2, 1), nn.LeakyReLU(0.2)]
            c = c2
        self.encoder = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 16, 2 * latent_dim))
        self.decoder = Generator(latent_dim, channels, image_size, width, textures)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction logits, posterior mean and log-variance of a batch ``x`` in [0, 1]."""
        mu, logvar = self.encoder(2 * x - 1).chunk(2, dim=1)
        logvar = logvar.clamp(-10, 10)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return self.decoder.logits(z), mu, logvar


class MappingNetwork(nn.Module):
    """Fingerprint bits -> one modulation vector per conv layer: ``1 + affine(MLP(f)) + skip(f)``.

    The MLP heads start at zero. The linear skip starts as an *assignment*: bit j drives
    carrier channel ``j mod len(carriers)`` (the generator's texture inputs) with scale
    ``1 +/- gain``; everything else starts at 1, i.e. at the root. Without it training sits on a
    plateau: a random decoder gives no useful gradient to the mapping, a zero mapping gives
    none to the decoder, and the cheapest way down the bit loss is to shrink the
    modulation. With it, every bit starts as a fixed pattern the decoder learns to read in a
    few dozen steps; both the skip and the MLP are trained from there.
    """

    def __init__(
        self,
        bits: int,
        style_dims: list[int],
        hidden: int = 256,
        depth: int = 2,
        carriers: list[tuple[int, int]] | None = None,
        gain: float = 1.0,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        d = bits
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.LeakyReLU(0.2)]
            d = hidden
        self.mlp = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(hidden, k) for k in style_dims])
        self.skips = nn.ModuleList([nn.Linear(bits, k, bias=False) for k in style_dims])
        for h in self.heads:
            nn.init.zeros_(h.weight)
            nn.init.zeros_(h.bias)
        for sk in self.skips:
            nn.init.zeros_(sk.weight)
        if carriers:
            with torch.no_grad():
                for j in range(bits):
                    layer, ch = carriers[j % len(carriers)]
                    self.skips[layer].weight[ch, j] = gain

    def forward(self, bits: Tensor) -> list[Tensor]:
        f = 2 * bits.float() - 1
        h = self.mlp(f)
        return [1 + head(h) + skip(f) for head, skip in zip(self.heads, self.skips, strict=True)]


class FingerprintDecoder(nn.Module):
    """CNN from an image in [0, 1] to one logit per fingerprint bit.

    Three stride-2 stages down to a 4x4 map (for 32x32 input), then flattened into an MLP.
    Flattening keeps where things are; a global average pool would make the read-out blind to
    position, and so to any fingerprint that is a fixed spatial pattern, the easiest kind to
    make. Robustness to crops is left to the training augmentation.
    """

    def __init__(self, channels: int, bits: int, width: int = 32, image_size: int = 32):
        super().__init__()
        w = width
        # A linear read-out beside the CNN: a matched filter for fixed-pattern carriers, which
        # it learns in a few steps (a convex problem) while the CNN is still finding its features.
        self.linear = nn.Linear(channels * image_size * image_size, bits)
        self.net = nn.Sequential(
            nn.Conv2d(channels, w, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, w, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 2 * w, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 3, 1, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 4 * w, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * w, 8 * w), nn.LeakyReLU(0.2),
            nn.Linear(8 * w, bits),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        x = 2 * x - 1
        return self.net(x) + self.linear(x.flatten(1))


class WouafModel(nn.Module):
    """Frozen root generator + mapping network + fingerprint decoder (+ training augmentation)."""

    def __init__(
        self,
        root: Generator,
        bits: int = 32,
        hidden: int = 256,
        decoder_width: int = 32,
        augment: Augment | None = None,
        carrier_gain: float = 1.0,
    ):
        super().__init__()
        self.root = root
        self.root.requires_grad_(False)
        self.bits = bits
        self.mapping = MappingNetwork(bits, root.style_dims, hidden, carriers=root.carriers, gain=carrier_gain)
        self.decoder = FingerprintDecoder(root.channels, bits, decoder_width, root.image_size)
        self.augment = augment
        # Training steps taken, for the quality curriculum; a buffer so that it is saved in the
        # trainer's checkpoints (--resume continues the schedule) and broadcast by DDP.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> WouafModel:
        super().train(mode)
        self.root.eval()  # frozen: never in training mode
        return self

    def generate(self, z: Tensor, bits: Tensor) -> Tensor:
        """The fingerprinted image of latent ``z`` for fingerprint ``bits`` (B, bits) in {0, 1}."""
        return self.root(z, self.mapping(bits))

    def decode(self, x: Tensor) -> Tensor:
        """Decoded bits (B, bits) in {0, 1} of images ``x``."""
        return (self.decoder(x) > 0).to(torch.uint8)

    def forward(self, z: Tensor, bits: Tensor) -> dict[str, Tensor]:
        """Root image, fingerprinted image, and bit logits of the clean and augmented image."""
        with torch.no_grad():
            root = self.root(z)
            if self.training:
                self.step += 1
        img = self.generate(z, bits)
        if self.training and self.augment is not None:
            logits = self.decoder(torch.cat([img, self.augment(img)]))
            clean, aug = logits.chunk(2)
        else:
            clean = aug = self.decoder(img)
        return {"root": root, "image": img, "logits": clean, "logits_aug": aug}


def make_keys(
    root: Generator, n_keys: int, seed: int = 0, n_samples: int = 512, steps: int = 300, margin: float = 1.0, device: torch.device | str = "cpu"
) -> Tensor:
    """Data-compliant, orthogonal keys for the baseline, ``(n_keys, C*H*W)``, unit norm.

    Key k starts from a seeded random direction and minimises ``mean(relu(margin + phi . x))``
    over root outputs ``x`` (mapped to [-1, 1]) by projected gradient descent: after each step
    it is projected onto the orthogonal complement of keys 0..k-1 and renormalised, so keys
    are exactly orthogonal and the root's outputs score below ``-margin`` under each (the
    paper's data compliance, with root samples standing in for the data).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(n_samples, root.latent_dim, generator=g).to(device)
        x = (2 * root(z) - 1).flatten(1)
    dim = x.shape[1]
    if n_keys > dim:
        raise ValueError(f"{n_keys} keys cannot be orthogonal in {dim} dimensions")
    keys = torch.zeros(0, dim, device=device)

    def project(v: Tensor) -> Tensor:
        v = v - (v @ keys.T) @ keys if len(keys) else v
        return v / v.norm()

    for _ in range(n_keys):
        phi = project(torch.randn(dim, generator=g).to(device)).requires_grad_(True)
        opt = torch.optim.Adam([phi], lr=0.01)
        for _ in range(steps):
            loss = F.relu(margin + x @ phi).mean()
            if loss.item() == 0:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                phi.copy_(project(phi))
        keys = torch.cat([keys, phi.detach()[None]])
    return keys


class BaselineModel(nn.Module):
    """Frozen root, the keys, and one user generator per key (fine-tuned copies of the root)."""

    def __init__(self, root: Generator, keys: Tensor, augment: Augment | None = None):
        super().__init__()
        self.root = root
        self.root.requires_grad_(False)
        self.users = nn.ModuleList([copy.deepcopy(root).requires_grad_(True) for _ in range(len(keys))])
        self.register_buffer("keys", keys.clone())
        self.augment = augment

    def train(self, mode: bool = True) -> BaselineModel:
        super().train(mode)
        self.root.eval()
        return self

    @property
    def n_users(self) -> int:
        return len(self.users)

    def scores(self, x: Tensor) -> Tensor:
        """Every key's linear score ``phi . (2x - 1)`` of images ``x`` in [0, 1]: ``(B, K)``."""
        return (2 * x - 1).flatten(1) @ self.keys.T

    def attribute(self, x: Tensor) -> Tensor:
        """The user whose key scores highest, if that score is positive; else -1 (no user)."""
        s = self.scores(x)
        best, idx = s.max(1)
        return torch.where(best > 0, idx, torch.full_like(idx, -1))

    def forward(self, z: Tensor) -> dict[str, Tensor]:
        """Images of every user for its share of ``z`` (round robin; every user gets >= 1).

        Returns ``image`` and ``root`` (K*n, C, H, W), ``user`` (K*n,) and ``score``: each
        image's score under its own user's key, after augmentation when training.
        """
        k = self.n_users
        n = max(1, math.ceil(len(z) / k))
        z = z.repeat(math.ceil(n * k / len(z)), 1)[: n * k].view(n, k, -1).transpose(0, 1)  # (K, n, latent)
        with torch.no_grad():
            root = self.root(z.reshape(n * k, -1))
        img = torch.cat([g(z[i]) for i, g in enumerate(self.users)])
        user = torch.arange(k, device=z.device).repeat_interleave(n)
        seen = self.augment(img) if self.training and self.augment is not None else img
        score = ((2 * seen - 1).flatten(1) * self.keys[user]).sum(1)
        return {"image": img, "root": root, "user": user, "score": score}


# =========================================================================== data


class LatentDataset(Dataset):
    """Seeded latents (and fingerprints): item ``i`` is a pure function of ``(seed, i)``.

    Generated on demand, so the trainer's DistributedSampler shards it like any data set.
    """

    def __init__(self, n: int, latent_dim: int, bits: int = 0, seed: int = 0):
        self.n, self.latent_dim, self.bits, self.seed = n, latent_dim, bits, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, i])
        z = torch.from_numpy(rng.standard_normal(self.latent_dim).astype(np.float32))
        if not self.bits:
            return z
        return z, torch.from_numpy(rng.integers(0, 2, self.bits).astype(np.float32))


# =========================================================================== artefacts


def save_root(vae: VAE, path: Path, data_config: dict[str, Any]) -> None:
    """Write the root generator (with its VAE encoder and the data it was trained on)."""
    state = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
    torch.save({"kind": "root", "generator": vae.decoder.config(), "data": data_config, "state_dict": state}, path)


def load_root(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Generator, dict[str, Any]]:
    """The root generator (eval mode) and its saved metadata from ``root_generator.pt``."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    vae = VAE(**ckpt["generator"])
    vae.load_state_dict(ckpt["state_dict"])
    return vae.decoder.eval(), ckpt


def load_wouaf(path: str | Path, root: Generator, map_location: str | torch.device = "cpu") -> tuple[WouafModel, dict[str, Any]]:
    """The WOUAF model (eval mode, on ``root``) from ``wouaf_model.pt`` and its metadata."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    cfg = ckpt["config"]
    model = WouafModel(root, cfg["bits"], cfg["mapping_hidden"], cfg["decoder_width"])
    model.mapping.load_state_dict(ckpt["mapping"])
    model.decoder.load_state_dict(ckpt["decoder"])
    return model.eval(), ckpt


def load_baseline(path: str | Path, root: Generator, map_location: str | torch.device = "cpu") -> tuple[BaselineModel, dict[str, Any]]:
    """The baseline (keys and user generators, eval mode) from ``baseline_models.pt``."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = BaselineModel(root, ckpt["keys"])
    model.users.load_state_dict(ckpt["users"])
    return model.eval(), ckpt


# =========================================================================== stages


def _default_channels(data: str) -> int:
    """3 for colour sources (shapes, ImageFolder), 1 for digits and IDX."""
    if data == "shapes":
        return 3
    p = Path(data)
    if data == "digits" or p.is_file() or (p.is_dir() and any("idx3" in f.name.lower() for f in p.iterdir())):
        return 1
    return 3


def _data_config(args: argparse.Namespace) -> dict[str, Any]:
    channels = args.channels or _default_channels(args.data)
    return {"data": str(args.data), "image_size": int(args.image_size), "channels": int(channels), "seed": int(args.data_seed)}


def _root_path(args: argparse.Namespace, ctx: StageContext) -> Path:
    p = Path(args.root) if getattr(args, "root", None) else Path(ctx.out_dir) / ROOT_FILE
    if not p.exists():
        raise FileNotFoundError(f"no root generator at {p}: run --stage root first (same --out) or pass --root")
    return p


def _augment_from(args: argparse.Namespace) -> Augment | None:
    if args.aug_strength <= 0 or args.aug_prob <= 0:
        return None
    return Augment(strength=args.aug_strength, p=args.aug_prob, jpeg_mode=args.jpeg_mode)


class RootStage(Stage):
    """Stage (a): the root VAE on the image data."""

    name = "root"
    default_steps = 3000
    default_batch_size = 32
    default_lr = 1e-3

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.data = _data_config(args)
        self.default_steps = args.root_steps

    def build_model(self, ctx: StageContext) -> nn.Module:
        torch.manual_seed(ctx.seed)
        a = self.args
        textures = a.textures if a.textures is not None else math.ceil(a.fingerprint_bits / (_n_levels(self.data["image_size"]) + 1))
        return VAE(a.latent_dim, self.data["channels"], self.data["image_size"], a.width, textures)

    def train_dataset(self, ctx: StageContext) -> Dataset:
        d = self.data
        return image_dataset(d["data"], d["image_size"], d["channels"], train=True, seed=d["seed"])

    def loss(self, model: nn.Module, batch: Any, ctx: StageContext) -> tuple[Tensor, dict[str, float]]:
        x = (batch[0] if isinstance(batch, list | tuple) else batch).to(ctx.device)
        logits, mu, logvar = model(x)
        # Per-pixel BCE plus the KL divergence spread over the pixels, so beta is scale-free.
        rec = F.binary_cross_entropy_with_logits(logits, x)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean() / x[0].numel()
        loss = rec + self.args.beta * kl
        mse = F.mse_loss(torch.sigmoid(logits.detach()), x)
        return loss, _float_metrics({"rec": rec, "kl": kl, "mse": mse})

    def evaluate(self, model: nn.Module, ctx: StageContext) -> dict[str, float]:
        d = self.data
        test = image_dataset(d["data"], d["image_size"], d["channels"], train=False, seed=d["seed"])
        n = min(len(test), 256)
        x = torch.stack([test[i][0] for i in range(n)]).to(ctx.device)
        model.eval()
        with torch.no_grad():
            mse = F.mse_loss(torch.sigmoid(model(x)[0]), x).item()
        return {"test_mse": mse, "test_psnr": psnr_from_mse(mse)}

    def finish(self, model: nn.Module, ctx: StageContext) -> None:
        path = Path(ctx.out_dir) / ROOT_FILE
        save_root(_unwrap(model), path, self.data)
        log.info("root generator written to %s", path)


class WouafStage(Stage):
    """Stage (b): WOUAF mapping network and fingerprint decoder on the frozen root."""

    name = "wouaf"
    default_steps = 6000
    default_batch_size = 32
    default_lr = 1e-3

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.default_steps = args.wouaf_steps
        self.default_lr = args.wouaf_lr

    def psnr_budget(self, step: int) -> float:
        """The PSNR the bits may go down to at ``step``: ``--psnr-start`` rising linearly to
        ``--psnr-target`` over ``--psnr-ramp-steps`` (a curriculum: carriers are found while
        loud, then made quiet)."""
        a = self.args
        frac = min(1.0, step / a.psnr_ramp_steps) if a.psnr_ramp_steps > 0 else 1.0
        return a.psnr_start + (a.psnr_target - a.psnr_start) * frac

    def build_model(self, ctx: StageContext) -> nn.Module:
        root, _ = load_root(_root_path(self.args, ctx), map_location=ctx.device)
        torch.manual_seed(ctx.seed)
        a = self.args
        model = WouafModel(root, a.fingerprint_bits, a.mapping_hidden, a.decoder_width, _augment_from(a), a.carrier_gain)
        return model.to(ctx.device)

    def train_dataset(self, ctx: StageContext) -> Dataset:
        return LatentDataset(self.args.latent_samples, self.args.latent_dim, self.args.fingerprint_bits, seed=ctx.seed + 1)

    def loss(self, model: nn.Module, batch: Any, ctx: StageContext) -> tuple[Tensor, dict[str, float]]:
        z, bits = (t.to(ctx.device) for t in batch)
        out = model(z, bits)
        budget_db = self.psnr_budget(int(_unwrap(model).step))
        budget = 10 ** (-budget_db / 10)
        bce_clean = F.binary_cross_entropy_with_logits(out["logits"], bits)
        bce_aug = F.binary_cross_entropy_with_logits(out["logits_aug"], bits)
        diff = out["image"] - out["root"]
        mse = diff.pow(2).mean()
        # L1 is scaled so that it equals the MSE term for a uniform error at the budget.
        dist = diff.abs().mean() / math.sqrt(budget) if self.args.quality_loss == "l1" else mse / budget
        # A steady pull towards the root plus a steep wall past the MSE budget of the current
        # PSNR target: the bits may spend the budget, not more.
        over = F.relu(mse / budget - 1)
        loss = 0.5 * (bce_clean + bce_aug) + self.args.quality_weight * dist + self.args.budget_weight * over
        with torch.no_grad():
            acc = ((out["logits"] > 0) == (bits > 0.5)).float().mean()
            acc_aug = ((out["logits_aug"] > 0) == (bits > 0.5)).float().mean()
        return loss, _float_metrics(
            {
                "bce": bce_clean, "bce_aug": bce_aug, "mse": mse, "psnr": psnr_from_mse(mse, PSNR_LOG_CAP),
                "psnr_budget": budget_db, "bit_acc": acc, "bit_acc_aug": acc_aug,
            }
        )  # fmt: skip

    def evaluate(self, model: nn.Module, ctx: StageContext) -> dict[str, float]:
        m = _unwrap(model).eval()
        g = torch.Generator().manual_seed(ctx.seed + 7)
        n = 256
        z = torch.randn(n, m.root.latent_dim, generator=g).to(ctx.device)
        bits = torch.randint(0, 2, (n, m.bits), generator=g).to(ctx.device)
        out: dict[str, float] = {}
        with torch.no_grad():
            img = m.generate(z, bits)
            out["psnr"] = psnr_from_mse(F.mse_loss(img, m.root(z)))
            for name in ("clean", "jpeg50", "blur", "crop"):
                x = apply_postprocess(name, img.cpu(), seed=ctx.seed).to(ctx.device)
                out[f"bit_acc_{name}"] = (m.decode(x) == bits).float().mean().item()
        return out

    def finish(self, model: nn.Module, ctx: StageContext) -> None:
        m = _unwrap(model)
        a = self.args
        cfg = {"bits": a.fingerprint_bits, "mapping_hidden": a.mapping_hidden, "decoder_width": a.decoder_width, "psnr_target": a.psnr_target}
        cfg["steps_trained"] = int(m.step)
        state = {
            "kind": "wouaf",
            "config": cfg,
            "mapping": {k: v.cpu() for k, v in m.mapping.state_dict().items()},
            "decoder": {k: v.cpu() for k, v in m.decoder.state_dict().items()},
        }
        path = Path(ctx.out_dir) / WOUAF_FILE
        torch.save(state, path)
        log.info("WOUAF mapping network and fingerprint decoder written to %s", path)


class BaselineStage(Stage):
    """Stage (c): keys and user models of decentralized attribution."""

    name = "baseline"
    default_steps = 1500
    default_batch_size = 40
    default_lr = 5e-4

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.default_steps = args.baseline_steps

    def build_model(self, ctx: StageContext) -> nn.Module:
        root, _ = load_root(_root_path(self.args, ctx), map_location=ctx.device)
        # Same seed on every rank, so every rank derives the same keys (DDP also broadcasts
        # rank 0's buffers, the keys among them).
        keys = make_keys(root, self.args.users, seed=ctx.seed + 11, margin=self.args.baseline_margin, device=ctx.device)
        aug = _augment_from(self.args) if self.args.baseline_augment else None
        return BaselineModel(root, keys, aug).to(ctx.device)

    def train_dataset(self, ctx: StageContext) -> Dataset:
        return LatentDataset(self.args.latent_samples, self.args.latent_dim, 0, seed=ctx.seed + 2)

    def loss(self, model: nn.Module, batch: Any, ctx: StageContext) -> tuple[Tensor, dict[str, float]]:
        z = (batch[0] if isinstance(batch, list | tuple) else batch).to(ctx.device)
        out = model(z)
        hinge = F.relu(self.args.baseline_margin - out["score"]).mean()
        mse = (out["image"] - out["root"]).pow(2).mean()
        loss = hinge + self.args.baseline_gamma * mse
        pos = (out["score"] > 0).float().mean()
        return loss, _float_metrics({"hinge": hinge, "mse": mse, "psnr": psnr_from_mse(mse, PSNR_LOG_CAP), "positive": pos})

    def evaluate(self, model: nn.Module, ctx: StageContext) -> dict[str, float]:
        m = _unwrap(model).eval()
        g = torch.Generator().manual_seed(ctx.seed + 7)
        z = torch.randn(32 * m.n_users, m.root.latent_dim, generator=g).to(ctx.device)
        with torch.no_grad():
            out = m(z)
            img = apply_postprocess("clean", out["image"])
            acc = (m.attribute(img) == out["user"]).float().mean().item()
            root_fp = (m.attribute(apply_postprocess("clean", out["root"])) >= 0).float().mean().item()
        return {"attribution_acc": acc, "root_false_positive": root_fp, "psnr": psnr_from_mse(F.mse_loss(out["image"], out["root"]))}

    def finish(self, model: nn.Module, ctx: StageContext) -> None:
        m = _unwrap(model)
        a = self.args
        state = {
            "kind": "baseline",
            "config": {"users": a.users, "margin": a.baseline_margin, "gamma": a.baseline_gamma, "augment": bool(a.baseline_augment)},
            "keys": m.keys.cpu(),
            "users": {k: v.cpu() for k, v in m.users.state_dict().items()},
        }
        path = Path(ctx.out_dir) / BASELINE_FILE
        torch.save(state, path)
        log.info("baseline keys and %d user generators written to %s", m.n_users, path)


# =========================================================================== task


class AttributionTask(Task):
    """User-attributable generation: root generator, WOUAF fingerprints, key baseline."""

    name = "attribution"
    help = "attributable generative models (root VAE, WOUAF fingerprinting, decentralized-attribution baseline)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("attribution")
        g.add_argument("--stage", choices=("root", "wouaf", "baseline", "all"), default="all", help="stage(s) to run")
        g.add_argument("--data", default="digits", help="digits, shapes, an ImageFolder tree, or MNIST IDX file/folder")
        g.add_argument("--image-size", type=int, default=32, help="side of the square images (4 * 2^k)")
        g.add_argument("--channels", type=int, choices=(1, 3), default=None, help="default: 1 for digits/IDX, 3 otherwise")
        g.add_argument("--data-seed", type=int, default=0, help="seed of data splits and generated data")
        g.add_argument("--root", default=None, help="root_generator.pt to use (default: the one in --out)")
        g.add_argument("--latent-dim", type=int, default=16)
        g.add_argument("--width", type=int, default=64, help="channels of the generator's first layer")
        g.add_argument("--textures", type=int, default=None, help="fixed texture inputs per generator layer (default: enough carriers for one per fingerprint bit)")
        g.add_argument("--beta", type=float, default=1.0, help="VAE KL weight")
        g.add_argument("--root-steps", type=int, default=RootStage.default_steps)
        g.add_argument("--fingerprint-bits", type=int, default=32)
        g.add_argument("--mapping-hidden", type=int, default=256)
        g.add_argument("--decoder-width", type=int, default=16, help="channels of the fingerprint decoder's first layer")
        g.add_argument("--quality-loss", choices=("mse", "l1"), default="mse")
        g.add_argument("--quality-weight", type=float, default=0.02, help="weight of the distance to the root's output")
        g.add_argument("--psnr-target", type=float, default=33.0, help="final PSNR (dB) whose MSE budget the bits may spend")
        g.add_argument("--psnr-start", type=float, default=22.0, help="PSNR budget (dB) at the start of the curriculum")
        g.add_argument("--psnr-ramp-steps", type=int, default=3000, help="steps over which the budget rises to --psnr-target")
        g.add_argument("--carrier-gain", type=float, default=1.0, help="initial modulation of each bit's carrier channel")
        g.add_argument("--budget-weight", type=float, default=5.0, help="weight of the penalty past the PSNR budget")
        g.add_argument("--aug-strength", type=float, default=1.0, help="post-processing augmentation strength (0 = off)")
        g.add_argument("--aug-prob", type=float, default=0.85, help="probability that an image is post-processed")
        g.add_argument("--jpeg-mode", choices=("hybrid", "approx", "real"), default="hybrid")
        g.add_argument("--wouaf-steps", type=int, default=WouafStage.default_steps)
        g.add_argument("--wouaf-lr", type=float, default=WouafStage.default_lr)
        g.add_argument("--users", type=int, default=10, help="baseline: number of keys / user models")
        g.add_argument("--baseline-margin", type=float, default=1.0)
        g.add_argument("--baseline-gamma", type=float, default=100.0, help="baseline: weight of the MSE to the root")
        g.add_argument("--baseline-augment", action=argparse.BooleanOptionalAction, default=True)
        g.add_argument("--baseline-steps", type=int, default=BaselineStage.default_steps)
        g.add_argument("--latent-samples", type=int, default=100_000, help="size of the seeded latent data sets")

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("attribution evaluation")
        g.add_argument("--samples", type=int, default=1000, help="WOUAF images, one per pool user")
        g.add_argument("--pool-size", type=int, default=1000, help="users (random fingerprints) to attribute among")
        g.add_argument("--per-user", type=int, default=100, help="images per baseline user (side-by-side)")
        g.add_argument("--postprocesses", nargs="*", default=None, help="subset of the post-processes (default: all)")
        g.add_argument("--eval-seed", type=int, default=0)
        g.add_argument("--fid-steps", type=int, default=300, help="training steps of the FID feature network (0 = no FID)")
        g.add_argument("--no-grid", action="store_true", help="do not write attribution_grid.png")
        g.add_argument("--eval-device", default="cpu")

    def evaluate_checkpoint(self, args: argparse.Namespace) -> dict[str, Any]:
        """``switchml-eval attribution --ckpt RUN``: :func:`evaluate_attribution` on the run folder."""
        from trainer.eval.attribution_metrics import evaluate_attribution, format_results

        res = evaluate_attribution(
            args.ckpt,
            n_samples=args.samples,
            pool_size=args.pool_size,
            n_per_user=args.per_user,
            postprocesses=args.postprocesses,
            seed=args.eval_seed,
            fid=args.fid_steps > 0,
            fid_steps=max(1, args.fid_steps),
            grid=not args.no_grid,
            device=args.eval_device,
        )
        log.info("attribution results:\n%s", format_results(res))
        return res

    def stages(self, args: argparse.Namespace) -> list[Stage]:
        """The stages ``--stage`` names, in order."""
        table = {"root": RootStage, "wouaf": WouafStage, "baseline": BaselineStage}
        names = list(table) if args.stage == "all" else [args.stage]
        return [table[n](args) for n in names]


def default_args(**overrides: Any) -> argparse.Namespace:
    """The task's defaults as a Namespace (for tests and scripts), with ``overrides``."""
    p = argparse.ArgumentParser()
    AttributionTask.add_arguments(p)
    ns = p.parse_args([])
    for k, v in overrides.items():
        if not hasattr(ns, k):
            raise AttributeError(f"no attribution option {k!r}")
        setattr(ns, k, v)
    return ns


__all__ = [
    "AttributionTask",
    "BaselineModel",
    "BaselineStage",
    "FingerprintDecoder",
    "Generator",
    "LatentDataset",
    "MappingNetwork",
    "ModConv2d",
    "RootStage",
    "VAE",
    "WouafModel",
    "WouafStage",
    "default_args",
    "load_baseline",
    "load_root",
    "load_wouaf",
    "make_keys",
]
