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

The models and their files live in ``trainer.models.attribution`` (the evaluation loads them
from there; their names are re-exported here). The trainer wraps each stage's ``build_model`` result in DDP and calls ``loss`` with the
wrapped module; every stage therefore does all its trainable work in one ``forward`` call.
"""

from __future__ import annotations

import argparse
import json
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
from trainer.models.attribution import (
    BASELINE_FILE,
    ROOT_FILE,
    VAE,
    WOUAF_FILE,
    BaselineModel,
    FingerprintDecoder,
    Generator,
    MappingNetwork,
    ModConv2d,
    WouafModel,
    confidence,
    load_baseline,
    load_root,
    load_wouaf,
    make_keys,
    n_levels,
    save_root,
)
from trainer.postprocess import DEFAULT_AUGMENT_OPS, DEFAULT_CROP_SEARCH, Augment, apply_postprocess
from trainer.tasks.base import Stage, StageContext, Task

log = logging.getLogger(__name__)

Tensor = torch.Tensor


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


def _augment_from(args: argparse.Namespace, crop_search: bool = False) -> Augment | None:
    """The training augmentation; with ``crop_search`` its crops are undone as the search would."""
    if args.aug_strength <= 0 or args.aug_prob <= 0:
        return None
    ops = tuple("recrop" if op == "crop" and crop_search else op for op in DEFAULT_AUGMENT_OPS)
    return Augment(strength=args.aug_strength, p=args.aug_prob, ops=ops, jpeg_mode=args.jpeg_mode)


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
        textures = a.textures if a.textures is not None else math.ceil(a.fingerprint_bits / (n_levels(self.data["image_size"]) + 1))
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
        search = DEFAULT_CROP_SEARCH if a.crop_search else None
        model = WouafModel(
            root, a.fingerprint_bits, a.mapping_hidden, a.decoder_width, _augment_from(a, a.crop_search), a.carrier_gain, search
        )
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
        metrics = {}
        if "logits_wrong" in out:
            # Wrongly undone crops should read as "no opinion" (logit 0), so that the search's
            # confidence picks the right candidate.
            wrong = F.binary_cross_entropy_with_logits(out["logits_wrong"], torch.full_like(out["logits_wrong"], 0.5))
            loss = loss + self.args.wrong_weight * wrong
            metrics["bce_wrong"] = wrong
            metrics["wrong_confidence"] = confidence(out["logits_wrong"].detach()).mean()
        with torch.no_grad():
            acc = ((out["logits"] > 0) == (bits > 0.5)).float().mean()
            acc_aug = ((out["logits_aug"] > 0) == (bits > 0.5)).float().mean()
        return loss, _float_metrics(
            {
                "bce": bce_clean, "bce_aug": bce_aug, "mse": mse, "psnr": psnr_from_mse(mse, PSNR_LOG_CAP),
                "psnr_budget": budget_db, "bit_acc": acc, "bit_acc_aug": acc_aug, **metrics,
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
        if m.crop_search is not None:
            cfg["crop_search"] = {"ratios": list(m.crop_search.ratios), "step": m.crop_search.step}
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
        g.add_argument("--decoder-width", type=int, default=32, help="channels of the fingerprint decoder's first layer")
        g.add_argument("--quality-loss", choices=("mse", "l1"), default="mse")
        g.add_argument(
            "--quality-weight", type=float, default=0.0,
            help="weight of a steady pull towards the root's output (0: quality is only held at its budget)",
        )  # fmt: skip
        g.add_argument("--psnr-target", type=float, default=31.0, help="final PSNR (dB) whose MSE budget the bits may spend")
        g.add_argument("--psnr-start", type=float, default=22.0, help="PSNR budget (dB) at the start of the curriculum")
        g.add_argument("--psnr-ramp-steps", type=int, default=3000, help="steps over which the budget rises to --psnr-target")
        g.add_argument("--carrier-gain", type=float, default=1.0, help="initial modulation of each bit's carrier channel")
        g.add_argument("--budget-weight", type=float, default=5.0, help="weight of the penalty past the PSNR budget")
        g.add_argument("--aug-strength", type=float, default=1.0, help="post-processing augmentation strength (0 = off)")
        g.add_argument("--aug-prob", type=float, default=0.85, help="probability that an image is post-processed")
        g.add_argument("--jpeg-mode", choices=("hybrid", "approx", "real"), default="hybrid")
        g.add_argument(
            "--crop-search", action=argparse.BooleanOptionalAction, default=True,
            help="the decoder undoes every candidate crop-and-resize and reads the one it is surest of",
        )  # fmt: skip
        g.add_argument("--wrong-weight", type=float, default=0.5, help="weight of 'no opinion' on wrongly undone crops")
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
        g.add_argument(
            "--compare", action="append", default=[], metavar="[NAME=]RUN",
            help="another run to evaluate beside --ckpt (which also takes NAME=RUN); repeatable",
        )  # fmt: skip
        g.add_argument(
            "--report", default=None, metavar="FOLDER",
            help="write a table and a chart of the runs' PSNR against their attribution under each post-process",
        )  # fmt: skip
        g.add_argument(
            "--reuse", action="store_true",
            help="take a run's attribution_metrics.json instead of evaluating it again, when it is newer than "
                 "the run's models and was measured with the same --samples, --pool-size and --eval-seed",
        )  # fmt: skip

    def evaluate_checkpoint(self, args: argparse.Namespace) -> dict[str, Any]:
        """``switchml-eval attribution --ckpt RUN``: :func:`evaluate_attribution` on the run folder;
        with ``--compare``, on every run (``{name: metrics}``); with ``--report``, their trade-off."""
        from trainer.eval.attribution_metrics import evaluate_attribution, format_results, write_tradeoff

        results: dict[str, dict[str, Any]] = {}
        for item in [args.ckpt, *(getattr(args, "compare", []) or [])]:
            name, sep, path = item.partition("=")
            if not sep or "/" in name:
                name, path = Path(item).name if Path(item).is_dir() else Path(item).parent.name, item
            res = _saved_metrics(path, args) if getattr(args, "reuse", False) else None
            if res is None:
                res = evaluate_attribution(
                    path,
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
            log.info("attribution results of %s:\n%s", name, format_results(res))
            results[name] = res
        if getattr(args, "report", None):
            md, png = write_tradeoff(results, args.report)
            log.info("wrote %s and %s", md, png)
        return results if len(results) > 1 else next(iter(results.values()))

    def stages(self, args: argparse.Namespace) -> list[Stage]:
        """The stages ``--stage`` names, in order."""
        table = {"root": RootStage, "wouaf": WouafStage, "baseline": BaselineStage}
        names = list(table) if args.stage == "all" else [args.stage]
        return [table[n](args) for n in names]


def _saved_metrics(run: str | Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """The run's attribution_metrics.json if it still describes the run's models, measured as
    ``args`` asks; None (evaluate again) otherwise."""
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    saved = folder / "attribution_metrics.json"
    models = [folder / f for f in (ROOT_FILE, WOUAF_FILE, BASELINE_FILE) if (folder / f).exists()]
    if not saved.exists() or any(m.stat().st_mtime > saved.stat().st_mtime for m in models):
        return None
    res = json.loads(saved.read_text())
    cfg = res.get("config", {})
    if (cfg.get("n_samples"), cfg.get("pool_size"), cfg.get("seed")) != (args.samples, args.pool_size, args.eval_seed):
        log.info("%s was measured with other settings (%s): evaluating again", saved, cfg)
        return None
    log.info("reusing %s", saved)
    return res


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
