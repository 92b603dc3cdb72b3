"""The attribution task's stages, single process on tiny data (the trainer runs them over DDP).

A module fixture trains the three stages in order into one folder, as ``--stage all`` does:
root VAE, then WOUAF on the frozen root, then the key baseline; the tests check each loss
fell, the artefacts load, fingerprints round-trip, and the evaluation runs on them.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from trainer.eval.attribution_metrics import format_results
from trainer.models.attribution import FingerprintDecoder
from trainer.postprocess import DEFAULT_CROP_SEARCH, CropSearch, crop_resize
from trainer.tasks.attribution import (
    BASELINE_FILE,
    ROOT_FILE,
    WOUAF_FILE,
    AttributionTask,
    BaselineStage,
    Generator,
    LatentDataset,
    MappingNetwork,
    ModConv2d,
    RootStage,
    WouafStage,
    default_args,
    load_baseline,
    load_root,
    load_wouaf,
    make_keys,
)
from trainer.tasks.base import StageContext

torch.set_num_threads(1)

TINY = dict(
    data="digits", image_size=16, latent_dim=8, width=16, fingerprint_bits=8, mapping_hidden=32, decoder_width=8,
    users=3, psnr_start=14.0, psnr_target=18.0, psnr_ramp_steps=60, latent_samples=4096,
)  # fmt: skip


def train(stage, ctx: StageContext, steps: int, batch_size: int, lr: float | None = None):
    """The trainer's loop in miniature (no DDP): returns the model and the per-step losses."""
    torch.manual_seed(ctx.seed)
    model = stage.build_model(ctx)
    loader = DataLoader(stage.train_dataset(ctx), batch_size=batch_size, shuffle=True, drop_last=True)
    opt = stage.optimizer([p for p in model.parameters() if p.requires_grad], lr or stage.default_lr)
    losses, metrics = [], []
    model.train()
    it = iter(loader)
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        loss, m = stage.loss(model, batch, ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        metrics.append(m)
    stage.finish(model, ctx)
    return model, losses, metrics


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("attribution")
    args = default_args(**TINY)
    ctx = StageContext(out_dir=out, rank=0, world_size=1, device=torch.device("cpu"), seed=0)
    root_stage, wouaf_stage, base_stage = AttributionTask().stages(args)
    res = {"out": out, "args": args, "ctx": ctx}
    res["root"] = train(root_stage, ctx, 120, 32, lr=3e-3)
    res["root_eval"] = root_stage.evaluate(res["root"][0], ctx)
    res["wouaf"] = train(wouaf_stage, ctx, 220, 32, lr=3e-3)
    res["wouaf_eval"] = wouaf_stage.evaluate(res["wouaf"][0], ctx)
    res["baseline"] = train(base_stage, ctx, 100, 12, lr=5e-3)
    res["baseline_eval"] = base_stage.evaluate(res["baseline"][0], ctx)
    return res


# --------------------------------------------------------------------------- building blocks


def test_modconv_matches_grouped_modulate_demodulate():
    torch.manual_seed(0)
    conv = ModConv2d(5, 4)
    x = torch.randn(3, 5, 6, 6)
    assert torch.allclose(conv(x, torch.ones(3, 5)), conv(x, None), atol=1e-6)
    s = 1 + 0.5 * torch.randn(3, 5)
    # Reference: per-sample modulated weights, demodulated to the root filters' norms, applied
    # as a grouped convolution.
    w = conv.weight[None] * s[:, None, :, None, None]
    w = w * (conv.weight.flatten(1).norm(dim=1)[None] / w.flatten(2).norm(dim=2))[..., None, None, None]
    ref = F.conv2d(x.reshape(1, 15, 6, 6), w.reshape(12, 5, 3, 3), padding=1, groups=3).reshape(3, 4, 6, 6)
    ref = ref + conv.bias[None, :, None, None]
    assert torch.allclose(conv(x, s), ref, atol=1e-5)


def test_unit_styles_reproduce_the_root():
    torch.manual_seed(0)
    g = Generator(8, 1, 16, 16, textures=3).eval()
    z = torch.randn(4, 8)
    ones = [torch.ones(4, d) for d in g.style_dims]
    assert torch.allclose(g(z, ones), g(z), atol=1e-6)  # same function, rounding aside
    # An untrained mapping without carriers is the identity modulation.
    m = MappingNetwork(8, g.style_dims, hidden=16)
    bits = torch.randint(0, 2, (4, 8))
    assert torch.allclose(g(z, m(bits)), g(z), atol=1e-6)
    # With carriers, bit j scales carrier j by 1 +/- gain and leaves everything else alone.
    mc = MappingNetwork(8, g.style_dims, hidden=16, carriers=g.carriers, gain=0.5)
    styles = mc(bits)
    for j in range(8):
        layer, ch = g.carriers[j]
        assert torch.allclose(styles[layer][:, ch], 1 + 0.5 * (2 * bits[:, j].float() - 1))
    assert len(g.carriers) == 3 * len(g.style_dims)


def test_generator_rejects_odd_sizes():
    with pytest.raises(ValueError):
        Generator(8, 1, 24)


def test_latent_dataset_is_seeded():
    a, b = LatentDataset(10, 8, 32, seed=1), LatentDataset(10, 8, 32, seed=1)
    za, fa = a[3]
    zb, fb = b[3]
    assert torch.equal(za, zb) and torch.equal(fa, fb)
    assert not torch.equal(a[3][0], a[4][0])
    assert set(fa.unique().tolist()) <= {0.0, 1.0}
    assert LatentDataset(10, 8, 0)[0].shape == (8,)


def test_task_arguments_and_stage_selection():
    p = argparse.ArgumentParser()
    AttributionTask.add_arguments(p)
    args = p.parse_args(["--stage", "wouaf", "--fingerprint-bits", "48", "--users", "5"])
    assert args.fingerprint_bits == 48 and args.users == 5
    stages = AttributionTask().stages(args)
    assert [type(s) for s in stages] == [WouafStage]
    all_stages = AttributionTask().stages(p.parse_args([]))
    assert [s.name for s in all_stages] == ["root", "wouaf", "baseline"]
    assert AttributionTask.name == "attribution"
    with pytest.raises(AttributeError):
        default_args(no_such_option=1)


def test_wouaf_stage_needs_a_root(tmp_path):
    ctx = StageContext(out_dir=tmp_path, rank=0, world_size=1, device=torch.device("cpu"), seed=0)
    with pytest.raises(FileNotFoundError, match="root"):
        WouafStage(default_args(**TINY)).build_model(ctx)


# --------------------------------------------------------------------------- stages


def test_root_stage_loss_falls_and_saves(run):
    _, losses, _ = run["root"]
    assert _mean(losses[-10:]) < 0.8 * _mean(losses[:10])
    assert (run["out"] / ROOT_FILE).exists()
    g, ckpt = load_root(run["out"] / ROOT_FILE)
    assert ckpt["data"]["image_size"] == 16 and ckpt["data"]["channels"] == 1
    with torch.no_grad():
        x = g(torch.randn(4, 8))
    assert x.shape == (4, 1, 16, 16)
    assert run["root_eval"]["test_psnr"] > 12


def test_wouaf_stage_loss_falls_and_saves(run):
    _, losses, metrics = run["wouaf"]
    # The PSNR budget tightens during the run, so compare the bit loss, not the total.
    bce = [m["bce"] for m in metrics]
    assert _mean(bce[-20:]) < 0.7 * _mean(bce[:20])
    assert _mean(losses[-20:]) < _mean(losses[:20])
    assert metrics[-1]["psnr_budget"] == pytest.approx(18.0)
    ev = run["wouaf_eval"]
    assert ev["bit_acc_clean"] > 0.9 and set(ev) >= {"psnr", "bit_acc_jpeg50", "bit_acc_blur", "bit_acc_crop"}
    ckpt = torch.load(run["out"] / WOUAF_FILE, weights_only=True)
    assert ckpt["config"]["bits"] == 8 and ckpt["config"]["steps_trained"] == 220


def test_fingerprints_round_trip(run):
    root, _ = load_root(run["out"] / ROOT_FILE)
    model, _ = load_wouaf(run["out"] / WOUAF_FILE, root)
    g = torch.Generator().manual_seed(123)
    z = torch.randn(256, 8, generator=g)
    bits = torch.randint(0, 2, (256, 8), generator=g)
    with torch.no_grad():
        img = model.generate(z, bits)
        acc = (model.decode(img) == bits).float().mean().item()
        # The same image without the fingerprint (the root's) carries no information.
        acc_root = (model.decode(root(z)) == bits).float().mean().item()
        quality = 10 * math.log10(1 / F.mse_loss(img, root(z)).item())
    assert acc > 0.95, acc
    assert abs(acc_root - 0.5) < 0.1
    assert quality > 16


def test_wouaf_checkpoint_keeps_its_crop_search(run, tmp_path):
    root, _ = load_root(run["out"] / ROOT_FILE)
    model, ckpt = load_wouaf(run["out"] / WOUAF_FILE, root)
    assert model.crop_search == DEFAULT_CROP_SEARCH
    # A checkpoint from before the search reads images as they are.
    del ckpt["config"]["crop_search"]
    torch.save(ckpt, tmp_path / WOUAF_FILE)
    old, _ = load_wouaf(tmp_path / WOUAF_FILE, root)
    assert old.crop_search is None
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(old.decode(x), (old.decoder(x) > 0).to(torch.uint8))


def test_quality_is_held_at_its_budget_not_pulled_past_it(run):
    """Under the PSNR budget the loss is the bit losses alone: nothing rewards a quieter mark."""
    args = default_args(**TINY)
    stage = WouafStage(args)
    torch.manual_seed(0)
    model = stage.build_model(run["ctx"]).train()
    batch = next(iter(DataLoader(stage.train_dataset(run["ctx"]), batch_size=16)))
    with torch.no_grad():  # all-ones styles: the root's own image, far inside any budget
        for head in model.mapping.heads:
            head.weight.zero_()
        for skip in model.mapping.skips:
            skip.weight.zero_()
    loss, m = stage.loss(model, batch, run["ctx"])
    assert m["mse"] < 1e-10
    assert loss.item() == pytest.approx(0.5 * (m["bce"] + m["bce_aug"]) + args.wrong_weight * m["bce_wrong"], rel=1e-5)
    # Past the budget it costs: a loud mark pays for the excess.
    with torch.no_grad():
        model.mapping.skips[-1].weight.fill_(3.0)
    loss, m = stage.loss(model, batch, run["ctx"])
    assert m["psnr"] < m["psnr_budget"]
    assert loss.item() > 0.5 * (m["bce"] + m["bce_aug"]) + args.wrong_weight * m["bce_wrong"] + 0.1


def _matched_filter_decoder(bits: int, size: int, gain: float) -> tuple[FingerprintDecoder, torch.Tensor]:
    """A decoder that is a plain correlator with ``bits`` orthonormal mid-frequency patterns
    (its CNN silenced), and the patterns: a reader whose confidence is an honest signal."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(bits, 1, size * 3 // 8, size * 3 // 8, generator=g)
    t = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False).flatten(1)
    q, _ = torch.linalg.qr(t.T)
    patterns = q.T.reshape(bits, 1, size, size)
    dec = FingerprintDecoder(1, bits, 4, size)
    with torch.no_grad():
        dec.net[-1].weight.zero_()
        dec.net[-1].bias.zero_()
        dec.linear.weight.copy_(patterns.flatten(1) * gain)
        dec.linear.bias.zero_()
    return dec, patterns


def test_crop_search_reads_through_a_crop_that_defeats_the_plain_read_out():
    dec, patterns = _matched_filter_decoder(8, 32, gain=4.0)
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(0, 2, (48, 8), generator=g)
    x = 0.5 + 0.15 * torch.einsum("nb,bchw->nchw", 2 * bits.float() - 1, patterns) / patterns.abs().max()
    cropped = crop_resize(x, 0.8, torch.Generator().manual_seed(3))
    acc = lambda logits: ((logits > 0) == bits.bool()).float().mean().item()  # noqa: E731
    with torch.no_grad():
        assert acc(dec(x)) == 1.0 and acc(dec.search(x, DEFAULT_CROP_SEARCH)) == 1.0  # clean: identity wins
        assert acc(dec(cropped)) < 0.85
        assert acc(dec.search(cropped, DEFAULT_CROP_SEARCH)) > 0.97
        # A search without the crop's scale among its candidates does not find it.
        assert acc(dec.search(cropped, CropSearch(ratios=(0.5,), step=0.1))) < 0.85


def test_baseline_stage_loss_falls_and_attributes(run):
    model, losses, metrics = run["baseline"]
    assert _mean(losses[-10:]) < 0.8 * _mean(losses[:10])
    ev = run["baseline_eval"]
    assert ev["attribution_acc"] > 0.5 and ev["root_false_positive"] < 0.05
    base, ckpt = load_baseline(run["out"] / BASELINE_FILE, load_root(run["out"] / ROOT_FILE)[0])
    assert base.n_users == 3
    keys = base.keys
    assert torch.allclose(keys @ keys.T, torch.eye(3), atol=1e-5)  # orthonormal
    assert all(torch.equal(a, b) for a, b in zip(base.users.state_dict().values(), model.users.state_dict().values(), strict=True))
    g = torch.Generator().manual_seed(5)
    z = torch.randn(60, 8, generator=g)
    with torch.no_grad():
        own = torch.stack([base.scores(base.users[k](z))[:, k] for k in range(3)])
        root_scores = base.scores(base.root(z))
    assert (own > 0).float().mean() > 0.6  # user models moved to the positive side of their key
    assert (root_scores < 0).float().mean() > 0.95  # the root stays negative (data compliance)


def test_keys_are_data_compliant(run):
    root, _ = load_root(run["out"] / ROOT_FILE)
    keys = make_keys(root, 4, seed=3, steps=100)
    assert torch.allclose(keys @ keys.T, torch.eye(4), atol=1e-5)
    with torch.no_grad():
        x = 2 * root(torch.randn(256, 8)) - 1
    assert ((x.flatten(1) @ keys.T) < -0.5).float().mean() > 0.95


def test_evaluate_attribution_end_to_end(run):
    # Through the task's switchml-eval entry point, as `switchml-eval attribution --ckpt` calls it.
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt")
    AttributionTask.add_eval_arguments(p)
    args = p.parse_args(["--ckpt", str(run["out"] / ROOT_FILE), "--samples", "128", "--pool-size", "200",
                         "--per-user", "16", "--fid-steps", "20"])  # fmt: skip
    res = AttributionTask().evaluate_checkpoint(args)
    w, s = res["wouaf"], res["side_by_side"]
    for name in ("clean", "jpeg50", "jpeg75", "jpeg90", "blur", "noise", "crop", "brightness"):
        assert 0 <= w[name]["bit_acc"] <= 1 and 0 <= w[name]["attribution_acc"] <= 1
        assert 0 <= s["baseline"][name]["attribution_acc"] <= 1
        assert 0 <= s["wouaf"][name]["attribution_acc"] <= 1
    assert w["clean"]["bit_acc"] > 0.9
    assert s["baseline"]["clean"]["attribution_acc"] > 0.5
    assert 10 < w["quality"]["psnr"] < 60 and 0 < w["quality"]["ssim"] <= 1
    assert res["root"]["fid_vs_data"] >= 0 and w["quality"]["fid_vs_root"] >= 0
    assert (run["out"] / "attribution_grid.png").exists()
    saved = json.loads((run["out"] / "attribution_metrics.json").read_text())
    assert saved["wouaf"]["clean"]["bit_acc"] == w["clean"]["bit_acc"]
    table = format_results(res)
    assert "jpeg50" in table and "baseline" in table


def _eval_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt")
    AttributionTask.add_eval_arguments(p)
    return p.parse_args([*argv, "--samples", "64", "--pool-size", "100", "--per-user", "8", "--fid-steps", "0", "--no-grid"])


def test_tradeoff_report_and_reuse_of_saved_metrics(run, tmp_path):
    out = run["out"]
    first = AttributionTask().evaluate_checkpoint(_eval_args("--ckpt", f"loud={out}"))
    saved = out / "attribution_metrics.json"
    # --reuse takes the saved metrics (marked here, so that a second evaluation would show).
    marked = json.loads(saved.read_text())
    marked["wouaf"]["quality"]["psnr"] = 99.0
    saved.write_text(json.dumps(marked))
    both = AttributionTask().evaluate_checkpoint(
        _eval_args("--ckpt", f"loud={out}", "--compare", f"quiet={out}", "--reuse", "--report", str(tmp_path))
    )
    assert set(both) == {"loud", "quiet"} and both["quiet"]["wouaf"]["quality"]["psnr"] == 99.0
    md = (tmp_path / "attribution_tradeoff.md").read_text().splitlines()
    assert len(md) == 4 and "attr crop" in md[0]
    assert {row.split("|")[1].strip() for row in md[2:]} == {"loud", "quiet"} and all("| 99.00 |" in row for row in md[2:])
    assert (tmp_path / "attribution_tradeoff.png").stat().st_size > 0
    # Other settings, or a model newer than the metrics: evaluated again.
    again = AttributionTask().evaluate_checkpoint(_eval_args("--ckpt", str(out), "--reuse", "--eval-seed", "1"))
    assert again["wouaf"]["quality"]["psnr"] != 99.0
    saved.write_text(json.dumps(marked))
    later = saved.stat().st_mtime + 10
    os.utime(out / WOUAF_FILE, (later, later))
    again = AttributionTask().evaluate_checkpoint(_eval_args("--ckpt", str(out), "--reuse"))
    assert again["wouaf"]["quality"]["psnr"] == pytest.approx(first["wouaf"]["quality"]["psnr"])


def test_stage_defaults_come_from_arguments():
    args = default_args(root_steps=7, wouaf_steps=8, baseline_steps=9, wouaf_lr=0.01)
    assert RootStage(args).default_steps == 7
    assert WouafStage(args).default_steps == 8 and WouafStage(args).default_lr == 0.01
    assert BaselineStage(args).default_steps == 9
    s = WouafStage(default_args(psnr_start=20, psnr_target=30, psnr_ramp_steps=100))
    assert s.psnr_budget(0) == 20 and s.psnr_budget(50) == 25 and s.psnr_budget(1000) == 30
