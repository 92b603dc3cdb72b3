"""Metrics of attributable generators: bits, attribution, quality, robustness.

``evaluate_attribution(out_dir)`` loads what the attribution stages wrote
(``root_generator.pt``, ``wouaf_model.pt``, ``baseline_models.pt``) and measures, for WOUAF and the
decentralized-attribution baseline side by side, clean and under every evaluation
post-process of :mod:`trainer.postprocess`:

- bit accuracy of the decoded fingerprints;
- attribution accuracy over a pool of users (1,000 random fingerprints by default): an image
  is attributed to the user whose fingerprint is nearest in Hamming distance to the decoded
  bits; a tie with another user counts as a miss (the conservative reading);
- attribution over the baseline's ``K`` users, for both methods on the same latents;
- quality against the root model's output for the same latent: PSNR and SSIM, and an
  FID-like Frechet distance on features of a small classifier trained on the data.

Every image is rounded to 8 bits before it is measured or post-processed, as a saved image is.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from switchml.extras import needs
from trainer.postprocess import EVAL_PARAMS, EVAL_POSTPROCESSES, apply_postprocess, quantize_8bit

log = logging.getLogger(__name__)

Tensor = torch.Tensor

# --------------------------------------------------------------------------- bits and users


def bit_accuracy(pred: Tensor, true: Tensor) -> float:
    """Fraction of bits equal in ``pred`` and ``true`` (same shape, values in {0, 1})."""
    if pred.shape != true.shape:
        raise ValueError(f"shapes differ: {tuple(pred.shape)} vs {tuple(true.shape)}")
    return (pred.bool() == true.bool()).float().mean().item()


def hamming_distances(bits: Tensor, pool: Tensor, chunk: int = 256) -> Tensor:
    """Hamming distance of every row of ``bits`` (N, L) to every row of ``pool`` (U, L): (N, U)."""
    b, p = bits.bool(), pool.bool()
    out = [(b[i : i + chunk, None, :] != p[None]).sum(-1) for i in range(0, len(b), chunk)]
    return torch.cat(out) if out else torch.zeros(0, len(p), dtype=torch.long)


def attribute(bits: Tensor, pool: Tensor) -> Tensor:
    """The index of the pool user nearest in Hamming distance to each row of ``bits``; -1 on a tie."""
    d = hamming_distances(bits, pool)
    best, idx = d.min(1)
    ties = (d == best[:, None]).sum(1) > 1
    return torch.where(ties, torch.full_like(idx, -1), idx)


def attribution_accuracy(bits: Tensor, true_users: Tensor, pool: Tensor) -> float:
    """Fraction of images whose decoded ``bits`` are uniquely nearest to their own user's fingerprint."""
    return (attribute(bits, pool) == true_users.to(torch.long)).float().mean().item()


def random_fingerprints(n: int, bits: int, seed: int = 0) -> Tensor:
    """``n`` distinct random fingerprints (uint8 rows in {0, 1}), seeded."""
    g = torch.Generator().manual_seed(seed)
    if n > 2**bits:
        raise ValueError(f"cannot draw {n} distinct {bits}-bit fingerprints")
    pool = torch.randint(0, 2, (n, bits), generator=g, dtype=torch.uint8)
    # Redraw duplicates (likely only for few bits), so every user has its own fingerprint.
    while len(torch.unique(pool, dim=0)) < n:
        uniq = torch.unique(pool, dim=0)
        extra = torch.randint(0, 2, (n - len(uniq), bits), generator=g, dtype=torch.uint8)
        pool = torch.cat([uniq, extra])
    return pool


# --------------------------------------------------------------------------- image quality


def psnr(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR in dB of batches ``(N, C, H, W)``; ``inf`` where the images are identical."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)  # mse == 0 gives +inf, as it should


def _gaussian_window(size: int, sigma: float) -> Tensor:
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(t**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (Wang et al. 2004) of batches ``(N, C, H, W)``, averaged over channels.

    Gaussian window (11 taps, sigma 1.5, shrunk to the image if it is smaller), statistics over
    the valid region only, K1 = 0.01, K2 = 0.03. Identical images give exactly 1.
    """
    n, c, h, w = x.shape
    size = min(window_size, h, w)
    size -= 1 - size % 2  # odd
    g = _gaussian_window(size, sigma).to(x.device)
    kx = g.view(1, 1, 1, size).repeat(c, 1, 1, 1)
    ky = g.view(1, 1, size, 1).repeat(c, 1, 1, 1)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)

    x, y = x.double(), y.double()
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return (num / den).flatten(1).mean(1)


def frechet_distance(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> float:
    """Frechet distance of Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D).

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, the trace of the square root
    taken through the symmetric form ``S_a^(1/2) S_b S_a^(1/2)``, which has the same eigenvalues.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ev, vec = np.linalg.eigh(sa)
    root_a = (vec * np.sqrt(np.clip(ev, 0, None))) @ vec.T
    cross = np.linalg.eigvalsh(root_a @ sb @ root_a)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


class FeatureNet(nn.Module):
    """A small classifier whose 64-d penultimate features define the FID-like distance."""

    def __init__(self, channels: int, n_classes: int, feat: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(64, feat, 3, 2, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(feat, n_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(2 * x - 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_feature_net(dataset, channels: int, n_classes: int, steps: int = 300, batch_size: int = 64, seed: int = 0) -> FeatureNet:
    """Train :class:`FeatureNet` on ``(image, label)`` items for ``steps`` Adam steps (eval mode on return)."""
    torch.manual_seed(seed)
    net = FeatureNet(channels, n_classes)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(dataset), (batch_size,), generator=g).tolist()
        items = [dataset[i] for i in idx]
        x = torch.stack([it[0] for it in items])
        y = torch.tensor([int(it[1]) for it in items])
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def _features(net: FeatureNet, x: Tensor, batch: int = 256) -> np.ndarray:
    return torch.cat([net.features(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


# --------------------------------------------------------------------------- pictures


def save_grid(
    path: str | Path,
    root: Tensor,
    marked: Tensor,
    true_bits: Tensor,
    decoded_bits: Tensor,
    baseline: Tensor | None = None,
    amplify: float = 10.0,
) -> Path:
    """A PNG: root samples, their fingerprinted versions with true/decoded bits (hex), the
    amplified difference, and optionally the baseline's user images, one column per latent."""
    with needs("train", "the evaluation's plots"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    n = len(root)
    rows = [("root", root), ("WOUAF", marked), (f"|diff| x{amplify:g}", ((marked - root).abs() * amplify).clamp(0, 1))]
    if baseline is not None:
        rows.append(("baseline", baseline))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.9 * n, 2.0 * len(rows)), squeeze=False)

    def show(ax, img: Tensor) -> None:
        a = img.detach().cpu().permute(1, 2, 0).numpy()
        ax.imshow(a[..., 0] if a.shape[-1] == 1 else a, cmap="gray" if a.shape[-1] == 1 else None, vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])

    for r, (label, imgs) in enumerate(rows):
        for i in range(n):
            show(axes[r, i], imgs[i])
        axes[r, 0].set_ylabel(label, fontsize=9)
    for i in range(n):
        t, d = _hex(true_bits[i]), _hex(decoded_bits[i])
        errs = int((true_bits[i].bool() != decoded_bits[i].bool()).sum())
        axes[1, i].set_title(f"true {t}\ndec  {d}\n{errs} bit err", fontsize=6, family="monospace")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _hex(bits: Tensor) -> str:
    v = 0
    for b in bits.tolist():
        v = (v << 1) | int(b)
    return f"{v:0{math.ceil(len(bits) / 4)}x}"


# --------------------------------------------------------------------------- evaluations


def _postprocess_names(postprocesses) -> list[str]:
    names = list(EVAL_POSTPROCESSES) if postprocesses is None else list(postprocesses)
    return ["clean"] + [n for n in names if n != "clean"]


def _batched(fn, *tensors: Tensor, batch: int = 256) -> Tensor:
    n = len(tensors[0])
    return torch.cat([fn(*(t[i : i + batch] for t in tensors)) for i in range(0, n, batch)])


@torch.no_grad()
def evaluate_wouaf(
    model,
    n_samples: int = 1000,
    pool_size: int = 1000,
    postprocesses=None,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Bit and attribution accuracy of a WOUAF model over ``pool_size`` random users, clean
    and per post-process, and PSNR/SSIM against the root. Returns (metrics, tensors used)."""
    g = torch.Generator().manual_seed(seed)
    pool = random_fingerprints(pool_size, model.bits, seed=seed + 1)
    users = torch.randint(0, pool_size, (n_samples,), generator=g)
    if n_samples <= pool_size:  # every user at most once
        users = torch.randperm(pool_size, generator=g)[:n_samples]
    z = torch.randn(n_samples, model.root.latent_dim, generator=g)
    bits = pool[users]
    gen = lambda zz, bb: model.generate(zz.to(device), bb.to(device)).cpu()  # noqa: E731
    marked = quantize_8bit(_batched(gen, z, bits, batch=batch_size))
    root = quantize_8bit(_batched(lambda zz: model.root(zz.to(device)).cpu(), z, batch=batch_size))
    dec = lambda xx: model.decode(xx.to(device)).cpu()  # noqa: E731
    out: dict[str, Any] = {}
    for i, name in enumerate(_postprocess_names(postprocesses)):
        x = apply_postprocess(name, marked, seed=seed + 100 + i)
        d = _batched(dec, x, batch=batch_size)
        out[name] = {"bit_acc": bit_accuracy(d, bits), "attribution_acc": attribution_accuracy(d, users, pool)}
    out["quality"] = {"psnr": psnr(marked, root).mean().item(), "ssim": ssim(marked, root).mean().item()}
    out["pool_size"] = pool_size
    out["n_samples"] = n_samples
    return out, {"z": z, "bits": bits, "marked": marked, "root": root, "pool": pool, "users": users}


@torch.no_grad()
def evaluate_side_by_side(
    wouaf, baseline, n_per_user: int = 100, postprocesses=None, seed: int = 0, batch_size: int = 256, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """WOUAF and the baseline over the same ``K`` users (the baseline's) and the same latents.

    Baseline: an image is attributed to the key with the highest score if it is positive.
    WOUAF: to the nearest of ``K`` random fingerprints. Also the baseline's rate of root
    images claimed by some key (false positives) and both methods' quality.
    """
    k = baseline.n_users
    g = torch.Generator().manual_seed(seed + 5)
    z = torch.randn(k * n_per_user, baseline.root.latent_dim, generator=g)
    users = torch.arange(k).repeat_interleave(n_per_user)
    root = quantize_8bit(_batched(lambda zz: baseline.root(zz.to(device)).cpu(), z, batch=batch_size))
    base_imgs = quantize_8bit(torch.cat([baseline.users[u](z[users == u].to(device)).cpu() for u in range(k)]))
    res: dict[str, Any] = {"users": k, "n_per_user": n_per_user, "baseline": {}, "wouaf": {} if wouaf is not None else None}
    if wouaf is not None:
        pool = random_fingerprints(k, wouaf.bits, seed=seed + 2)
        gen = lambda zz, bb: wouaf.generate(zz.to(device), bb.to(device)).cpu()  # noqa: E731
        w_imgs = quantize_8bit(_batched(gen, z, pool[users], batch=batch_size))
    attribute_keys = lambda xx: baseline.attribute(xx.to(device)).cpu()  # noqa: E731
    for i, name in enumerate(_postprocess_names(postprocesses)):
        x = apply_postprocess(name, base_imgs, seed=seed + 200 + i)
        att = _batched(attribute_keys, x, batch=batch_size)
        own = (baseline.scores(x.to(device)).cpu().gather(1, users[:, None])[:, 0] > 0).float().mean().item()
        fp = (_batched(attribute_keys, apply_postprocess(name, root, seed=seed + 300 + i), batch=batch_size) >= 0)
        res["baseline"][name] = {
            "attribution_acc": (att == users).float().mean().item(),
            "own_key_positive": own,
            "root_false_positive": fp.float().mean().item(),
        }
        if wouaf is not None:
            xw = apply_postprocess(name, w_imgs, seed=seed + 200 + i)
            d = _batched(lambda xx: wouaf.decode(xx.to(device)).cpu(), xw, batch=batch_size)
            res["wouaf"][name] = {"bit_acc": bit_accuracy(d, pool[users]), "attribution_acc": attribution_accuracy(d, users, pool)}
    res["baseline"]["quality"] = {"psnr": psnr(base_imgs, root).mean().item(), "ssim": ssim(base_imgs, root).mean().item()}
    if wouaf is not None:
        res["wouaf"]["quality"] = {"psnr": psnr(w_imgs, root).mean().item(), "ssim": ssim(w_imgs, root).mean().item()}
    res["_images"] = {"baseline": base_imgs, "root": root}
    return res


def evaluate_attribution(
    out_dir: str | Path,
    n_samples: int = 1000,
    pool_size: int = 1000,
    n_per_user: int = 100,
    postprocesses=None,
    seed: int = 0,
    fid: bool = True,
    fid_steps: int = 300,
    grid: bool = True,
    grid_samples: int = 8,
    device: str | torch.device = "cpu",
    write: bool = True,
) -> dict[str, Any]:
    """Evaluate everything the attribution stages wrote to ``out_dir`` (or beside a file in it).

    Reads ``root_generator.pt`` (required), ``wouaf_model.pt`` and ``baseline_models.pt`` (each optional:
    a part whose file is missing is reported as ``None``). With ``write``, writes
    ``attribution_metrics.json`` and ``attribution_grid.png`` to ``out_dir``. Returns::

        {"config": {...}, "postprocess_params": {...},
         "wouaf": {"clean": {"bit_acc", "attribution_acc"}, "<post-process>": {...},
                   "quality": {"psnr", "ssim", "fid_vs_root"}, "pool_size", "n_samples"} | None,
         "side_by_side": {"users", "wouaf": {...}, "baseline": {<pp>: {"attribution_acc",
                          "own_key_positive", "root_false_positive"}, "quality": {...}}} | None,
         "root": {"fid_vs_data"} | {}, "files": {...}}
    """
    from trainer.data.images import dataset_labels, image_dataset
    from trainer.models.attribution import BASELINE_FILE, ROOT_FILE, WOUAF_FILE, load_baseline, load_root, load_wouaf

    out_dir = Path(out_dir)
    if out_dir.is_file() or out_dir.suffix == ".pt":  # a checkpoint in the run folder
        out_dir = out_dir.parent
    device = torch.device(device)
    root, root_ckpt = load_root(out_dir / ROOT_FILE, map_location=device)
    data_cfg = root_ckpt.get("data", {})
    wouaf = load_wouaf(out_dir / WOUAF_FILE, root, map_location=device)[0] if (out_dir / WOUAF_FILE).exists() else None
    base = load_baseline(out_dir / BASELINE_FILE, root, map_location=device)[0] if (out_dir / BASELINE_FILE).exists() else None
    results: dict[str, Any] = {
        "config": {"n_samples": n_samples, "pool_size": pool_size, "n_per_user": n_per_user, "seed": seed, "data": data_cfg},
        "postprocess_params": {k: v for k, v in EVAL_PARAMS.items() if k in _postprocess_names(postprocesses)},
        "wouaf": None,
        "side_by_side": None,
        "root": {},
        "files": {},
    }
    tensors: dict[str, Tensor] = {}
    if wouaf is not None:
        results["wouaf"], tensors = evaluate_wouaf(wouaf, n_samples, pool_size, postprocesses, seed, device=device)
        log.info("WOUAF clean: %s", results["wouaf"]["clean"])
    side = None
    if base is not None:
        side = evaluate_side_by_side(wouaf, base, n_per_user, postprocesses, seed, device=device)
        results["side_by_side"] = {k: v for k, v in side.items() if k != "_images"}
        log.info("baseline clean: %s", side["baseline"]["clean"])
    if fid and data_cfg:
        try:
            train = image_dataset(data_cfg["data"], data_cfg["image_size"], data_cfg["channels"], True, data_cfg["seed"])
            test = image_dataset(data_cfg["data"], data_cfg["image_size"], data_cfg["channels"], False, data_cfg["seed"])
        except (OSError, ValueError) as e:  # the data may not be where it was at training time
            log.warning("no FID-like distance: cannot load the data (%s)", e)
        else:
            net = train_feature_net(train, data_cfg["channels"], dataset_labels(train), steps=fid_steps, seed=seed)
            g = torch.Generator().manual_seed(seed + 9)
            n_fid = min(n_samples, 1000)
            z = torch.randn(n_fid, root.latent_dim, generator=g)
            with torch.no_grad():
                root_imgs = quantize_8bit(root(z.to(device)).cpu())
            f_root = _features(net, root_imgs)
            real = torch.stack([test[i][0] for i in range(min(len(test), n_fid))])
            results["root"]["fid_vs_data"] = frechet_distance(_features(net, real), f_root)
            if wouaf is not None:
                results["wouaf"]["quality"]["fid_vs_root"] = frechet_distance(_features(net, tensors["marked"]), _features(net, tensors["root"]))
            if side is not None:
                s = side["_images"]
                results["side_by_side"]["baseline"]["quality"]["fid_vs_root"] = frechet_distance(
                    _features(net, s["baseline"]), _features(net, s["root"])
                )
    if write:
        if grid and wouaf is not None:
            m = grid_samples
            dec = wouaf.decode(tensors["marked"][:m].to(device)).cpu()
            b_imgs = None
            if base is not None:
                with torch.no_grad():
                    zs = tensors["z"][:m].to(device)
                    b_imgs = quantize_8bit(torch.cat([base.users[i % base.n_users](zs[i : i + 1]).cpu() for i in range(m)]))
            p = save_grid(out_dir / "attribution_grid.png", tensors["root"][:m], tensors["marked"][:m], tensors["bits"][:m], dec, b_imgs)
            results["files"]["grid"] = str(p)
        mp = out_dir / "attribution_metrics.json"
        results["files"]["metrics"] = str(mp)
        mp.write_text(json.dumps(_jsonable(results), indent=2))
    return results


def _jsonable(o):
    """``o`` with infinities as the strings "inf"/"-inf" (strict JSON has no infinity)."""
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and math.isinf(o):
        return "inf" if o > 0 else "-inf"
    return o


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table of ``evaluate_attribution``'s results, one row per post-process."""
    lines = []
    w = results.get("wouaf")
    s = results.get("side_by_side")
    names = list((w or {}).keys() if w else (s or {}).get("baseline", {}).keys())
    names = [n for n in names if n not in ("quality", "pool_size", "n_samples")]
    head = f"{'post-process':<12}"
    if w:
        head += f" {'WOUAF bit':>9} {'WOUAF attr@' + str(w['pool_size']):>16}"
    if s:
        head += f" {'WOUAF attr@' + str(s['users']):>13} {'baseline attr@' + str(s['users']):>17} {'root FP':>8}"
    lines.append(head)
    for n in names:
        row = f"{n:<12}"
        if w:
            row += f" {w[n]['bit_acc']:>9.4f} {w[n]['attribution_acc']:>16.4f}"
        if s:
            ww = s["wouaf"][n]["attribution_acc"] if s.get("wouaf") else float("nan")
            b = s["baseline"][n]
            row += f" {ww:>13.4f} {b['attribution_acc']:>17.4f} {b['root_false_positive']:>8.4f}"
        lines.append(row)
    if w:
        q = w["quality"]
        lines.append("WOUAF quality vs root: " + ", ".join(f"{k} {v:.4g}" for k, v in q.items()))
    if s:
        q = s["baseline"]["quality"]
        lines.append("baseline quality vs root: " + ", ".join(f"{k} {v:.4g}" for k, v in q.items()))
    if results.get("root"):
        lines.append("root vs data: " + ", ".join(f"{k} {v:.4g}" for k, v in results["root"].items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------- quality against robustness

#: Targets of issue 20, drawn on the trade-off chart.
TARGET_PSNR_DB = 30.0
TARGET_ATTRIBUTION = 0.90


def tradeoff_rows(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run with WOUAF results, quietest mark last: its name, PSNR, SSIM, clean
    bit accuracy and attribution accuracy clean and under every post-process."""
    rows = []
    for name, res in runs.items():
        w = res.get("wouaf")
        if not w:
            log.warning("run %s has no WOUAF results: left out of the trade-off", name)
            continue
        pps = [k for k in w if isinstance(w[k], dict) and "attribution_acc" in w[k]]
        rows.append({
            "run": name, "psnr": w["quality"]["psnr"], "ssim": w["quality"]["ssim"], "bit_acc_clean": w["clean"]["bit_acc"],
            "attribution": {k: w[k]["attribution_acc"] for k in pps},
        })  # fmt: skip
    return sorted(rows, key=lambda r: r["psnr"])


def write_tradeoff(runs: dict[str, dict[str, Any]], folder: str | Path, stem: str = "attribution_tradeoff") -> tuple[Path, Path]:
    """A markdown table and a chart (PSNR against attribution under each post-process) of
    runs that differ in how loud their mark may be. Returns (markdown path, PNG path)."""
    rows = tradeoff_rows(runs)
    if not rows:
        raise ValueError("no run has WOUAF results to put on a trade-off curve")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pps = list(rows[0]["attribution"])
    head = ["run", "PSNR (dB)", "SSIM", "bit acc clean", *(f"attr {p}" for p in pps)]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for r in rows:
        cells = [r["run"], f"{r['psnr']:.2f}", f"{r['ssim']:.3f}", f"{r['bit_acc_clean']:.3f}"]
        lines.append("| " + " | ".join(cells + [f"{r['attribution'][p]:.3f}" for p in pps]) + " |")
    md = folder / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    with needs("train", "the evaluation's plots"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [r["psnr"] for r in rows]
    for p in pps:
        ax.plot(x, [r["attribution"][p] for r in rows], marker="o", label=p)
    ax.axhline(TARGET_ATTRIBUTION, color="grey", linestyle="--", linewidth=0.8)
    ax.axvline(TARGET_PSNR_DB, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("PSNR against the root (dB): quieter marks to the right")
    ax.set_ylabel(f"attribution accuracy, {runs[rows[0]['run']]['wouaf']['pool_size']} users")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("WOUAF: image quality against robustness")
    png = folder / f"{stem}.png"
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return md, png
