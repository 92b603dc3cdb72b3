"""The attribution task's models and their files: the root generator (a VAE's decoder), WOUAF's
weight-modulated generator with its fingerprint decoder, and the key baseline.

Shared by the task that trains them (``trainer.tasks.attribution``) and the evaluation that
loads them (``trainer.eval.attribution_metrics``), so that neither imports the other.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.postprocess import Augment, CropSearch, misaligned, uncrop

Tensor = torch.Tensor

ROOT_FILE = "root_generator.pt"
# Not "<stage>.pt": those are the trainer's per-stage checkpoints (model, optimiser, step).
WOUAF_FILE = "wouaf_model.pt"
BASELINE_FILE = "baseline_models.pt"


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


def n_levels(image_size: int) -> int:
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
        n = n_levels(image_size)
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
        n = n_levels(image_size)
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

    def search(self, x: Tensor, crop_search: CropSearch, candidates_per_pass: int = 16) -> Tensor:
        """Bit logits of ``x`` read through every candidate of ``crop_search``: for each image,
        the reading the decoder is most confident of (mean log-likelihood of its own hard
        decisions, ``-softplus(-|logit|)``; the identity wins ties)."""
        cands = crop_search.candidates().to(x.device, x.dtype)
        n = x.shape[0]
        best = self(x)
        best_score = confidence(best)
        for start in range(1, len(cands), candidates_per_pass):
            c = cands[start : start + candidates_per_pass]
            k = len(c)
            xs = x.repeat(k, 1, 1, 1)  # candidate-major: rows j*n .. j*n+n-1 are candidate j
            logits = self(uncrop(xs, c[:, 0].repeat_interleave(n), c[:, 1:].repeat_interleave(n, 0))).view(k, n, -1)
            score, j = confidence(logits).max(0)
            better = score > best_score
            best = torch.where(better[:, None], logits[j, torch.arange(n, device=x.device)], best)
            best_score = torch.maximum(score, best_score)
        return best


def confidence(logits: Tensor) -> Tensor:
    """How sure a reading is: the mean log-likelihood of its hard bit decisions (0 = certain)."""
    return -F.softplus(-logits.abs()).mean(-1)


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
        crop_search: CropSearch | None = None,
    ):
        super().__init__()
        self.root = root
        self.root.requires_grad_(False)
        self.bits = bits
        self.mapping = MappingNetwork(bits, root.style_dims, hidden, carriers=root.carriers, gain=carrier_gain)
        self.decoder = FingerprintDecoder(root.channels, bits, decoder_width, root.image_size)
        self.augment = augment
        #: The crops the decoder searches before reading; None: it reads the image as it is.
        self.crop_search = crop_search
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

    def read(self, x: Tensor) -> Tensor:
        """Bit logits (B, bits) of images ``x``, through the crop search if the model has one."""
        return self.decoder(x) if self.crop_search is None else self.decoder.search(x, self.crop_search)

    def decode(self, x: Tensor) -> Tensor:
        """Decoded bits (B, bits) in {0, 1} of images ``x``."""
        return (self.read(x) > 0).to(torch.uint8)

    def forward(self, z: Tensor, bits: Tensor) -> dict[str, Tensor]:
        """Root image, fingerprinted image, and bit logits of the clean and augmented image
        (and, training with a crop search, of the image as wrong candidates show it)."""
        with torch.no_grad():
            root = self.root(z)
            if self.training:
                self.step += 1
        img = self.generate(z, bits)
        out = {"root": root, "image": img}
        if self.training and self.augment is not None:
            views = [img, self.augment(img)]
            if self.crop_search is not None:
                views.append(misaligned(img, self.crop_search))
            logits = self.decoder(torch.cat(views)).chunk(len(views))
            out["logits"], out["logits_aug"] = logits[0], logits[1]
            if self.crop_search is not None:
                out["logits_wrong"] = logits[2]
        else:
            out["logits"] = out["logits_aug"] = self.decoder(img)
        return out


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
    search = cfg.get("crop_search")  # absent from checkpoints older than the search
    crop_search = CropSearch(tuple(search["ratios"]), search["step"]) if search else None
    model = WouafModel(root, cfg["bits"], cfg["mapping_hidden"], cfg["decoder_width"], crop_search=crop_search)
    model.mapping.load_state_dict(ckpt["mapping"])
    model.decoder.load_state_dict(ckpt["decoder"])
    return model.eval(), ckpt


def load_baseline(path: str | Path, root: Generator, map_location: str | torch.device = "cpu") -> tuple[BaselineModel, dict[str, Any]]:
    """The baseline (keys and user generators, eval mode) from ``baseline_models.pt``."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = BaselineModel(root, ckpt["keys"])
    model.users.load_state_dict(ckpt["users"])
    return model.eval(), ckpt
