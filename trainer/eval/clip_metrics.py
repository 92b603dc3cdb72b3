"""Compositional evaluation of image-text models on held-out procedural scenes.

Every metric takes a *scorer*: ``scorer(images, texts) -> similarity`` with ``images`` a
float tensor ``(N, 3, S, S)`` and ``texts`` a list of M strings, returning an ``(N, M)``
array (higher = more alike). A CLIP model becomes a scorer with :func:`model_scorer`;
:class:`OracleScorer` (the generator's ground truth, 1.0 everywhere) and
:class:`RandomScorer` (chance) check the metrics themselves.

Metrics (names as :func:`evaluate_scorer` returns them):

- ``comp/<split>/<kind>``: SugarCrepe-style accuracy, the fraction of images scored higher
  with their positive caption than with the hard negative of that kind (a tie counts
  half). ``<split>`` is ``test`` (held-out scenes of the training distribution) or
  ``combo`` (scenes with a colour-shape pair never seen in training); ``comp/<split>/avg``
  is the mean over the six kinds. Chance: 0.5. On request (``build_benchmark(...,
  splits=...)``, ``switchml-eval clip --train-split``) also ``train``: the first training
  scenes, each with all its kinds of negative, which tells a model that has not learnt its
  training pairs (it scores them as it scores held-out ones) from one that overfits them.
- ``retrieval/i2t_r1``, ``i2t_r5``, ``t2i_r1``, ``t2i_r5``: recall at K over a set of
  held-out scenes whose captions are pairwise false of each other's images (so the oracle
  has exactly one right answer). A candidate scored equal to the right one counts as ahead
  of it, so that a constant scorer gets no credit. Chance: K / N.
- ``zeroshot/shape``, ``zeroshot/colour``: accuracy on one-object images, every
  colour-shape pair equally often (held-out ones included). A class is scored by the mean
  similarity of its prompts ``"a photo of a {colour} {shape}"`` over the other attribute
  (prompt ensembling, as CLIP's zero-shot classifiers do). Chance: one over the classes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from switchml.extras import needs
from trainer.data.scenes import (
    NEGATIVE_KINDS,
    SINGLE_TEMPLATE,
    Scene,
    SceneGenerator,
    Tokenizer,
    caption_true_of,
    image_to_tensor,
    noun_phrase,
)

log = logging.getLogger(__name__)

#: ``scorer(images (N, 3, S, S), texts [M]) -> (N, M)`` similarities.
Scorer = Callable[[torch.Tensor, Sequence[str]], np.ndarray]

COMP_SPLITS = ("test", "combo")
#: The training scenes' split: scored only on request, for the gap between training and held-out scenes.
TRAIN_SPLIT = "train"
#: Offset of the retrieval scenes in the test split, so that they are not the scenes of the
#: compositional sets (any offset beyond the compositional sizes would do).
_RETRIEVAL_OFFSET = 1_000_000


def image_key(image: torch.Tensor) -> str:
    """A content hash of an image tensor (how the oracle finds the scene of an image)."""
    return hashlib.sha1(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass
class PairSet:
    """Images with a positive and a negative caption each (one SugarCrepe category)."""

    images: torch.Tensor
    positives: list[str]
    negatives: list[str]

    def __len__(self) -> int:
        return len(self.positives)


@dataclass
class ClipBenchmark:
    """Everything the metrics run on, built once from a generator by :func:`build_benchmark`."""

    compositional: dict[str, dict[str, PairSet]]
    retrieval_images: torch.Tensor
    retrieval_captions: list[str]
    zeroshot_images: torch.Tensor
    zeroshot_shapes: list[int]
    zeroshot_colours: list[int]
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    #: image_key -> the scene rendered in it (for the oracle).
    scenes: dict[str, Scene] = field(default_factory=dict)


def _render(gen: SceneGenerator, scene: Scene, scenes: dict[str, Scene]) -> torch.Tensor:
    img = image_to_tensor(gen.render(scene))
    scenes[image_key(img)] = scene
    return img


def build_benchmark(generator: SceneGenerator, n_per_kind: int = 200, n_retrieval: int = 200,
                    n_zeroshot: int | None = None, splits: Sequence[str] = COMP_SPLITS) -> ClipBenchmark:
    """The held-out evaluation sets of ``generator`` (deterministic for its seed).

    ``n_per_kind`` scenes of each compositional split in ``splits`` (``COMP_SPLITS`` and,
    if asked, ``TRAIN_SPLIT``) serve every kind; ``n_zeroshot`` defaults to two images per
    colour-shape pair.
    """
    known = (*COMP_SPLITS, TRAIN_SPLIT)
    bad = [s for s in splits if s not in known]
    if bad or not splits:
        raise ValueError(f"splits must be some of {known}; got {list(splits)}")
    cfg = generator.config
    scenes: dict[str, Scene] = {}
    comp: dict[str, dict[str, PairSet]] = {}
    for split in splits:
        sets = {k: PairSet([], [], []) for k in NEGATIVE_KINDS}
        for i in range(n_per_kind):
            sample = generator.sample(split, i)
            img = _render(generator, sample.scene, scenes)
            for kind, neg in sample.negatives.items():
                s = sets[kind]
                s.images.append(img)
                s.positives.append(sample.caption)
                s.negatives.append(neg.caption)
        comp[split] = {k: PairSet(torch.stack(s.images), s.positives, s.negatives) for k, s in sets.items() if s.images}

    # Retrieval needs one right answer per query: skip a scene if its caption is true of an
    # image already taken or a taken caption is true of it (same objects and relation).
    chosen: list[Scene] = []
    i = _RETRIEVAL_OFFSET
    while len(chosen) < n_retrieval:
        if i - _RETRIEVAL_OFFSET > 50 * n_retrieval:
            raise RuntimeError(f"could not find {n_retrieval} mutually distinct scenes")
        scene = generator.sample("test", i).scene
        i += 1
        if not any(caption_true_of(c, scene.caption) or caption_true_of(scene, c.caption) for c in chosen):
            chosen.append(scene)
    r_images = torch.stack([_render(generator, s, scenes) for s in chosen])

    n_zs = n_zeroshot if n_zeroshot is not None else 2 * len(cfg.shapes) * len(cfg.colours)
    zs = [generator.sample("zeroshot", i).scene for i in range(n_zs)]
    z_images = torch.stack([_render(generator, s, scenes) for s in zs])
    return ClipBenchmark(
        compositional=comp,
        retrieval_images=r_images,
        retrieval_captions=[s.caption for s in chosen],
        zeroshot_images=z_images,
        zeroshot_shapes=[cfg.shapes.index(s.objects[0].shape) for s in zs],
        zeroshot_colours=[cfg.colours.index(s.objects[0].colour) for s in zs],
        shapes=tuple(cfg.shapes),
        colours=tuple(cfg.colours),
        scenes=scenes,
    )


# --------------------------------------------------------------------------- metrics


def pair_accuracy(scorer: Scorer, pairs: PairSet, batch_size: int = 64) -> float:
    """Fraction of images whose positive caption outscores their negative (ties count half)."""
    wins = 0.0
    for s in range(0, len(pairs), batch_size):
        imgs = pairs.images[s: s + batch_size]
        n = len(imgs)
        sim = np.asarray(scorer(imgs, pairs.positives[s: s + n] + pairs.negatives[s: s + n]), dtype=np.float64)
        pos, neg = np.diag(sim[:, :n]), np.diag(sim[:, n:])
        wins += float((pos > neg).sum() + 0.5 * (pos == neg).sum())
    return wins / len(pairs)


def compositional_accuracy(scorer: Scorer, bench: ClipBenchmark) -> dict[str, float]:
    """``comp/<split>/<kind>`` and ``comp/<split>/avg`` for every compositional split of ``bench``."""
    out: dict[str, float] = {}
    for split, sets in bench.compositional.items():
        accs = {kind: pair_accuracy(scorer, pairs) for kind, pairs in sets.items()}
        out.update({f"comp/{split}/{k}": v for k, v in accs.items()})
        out[f"comp/{split}/avg"] = float(np.mean(list(accs.values())))
    return out


def _ranks(sim: np.ndarray) -> np.ndarray:
    """Rank of the diagonal entry in each row; a tie counts as ahead (pessimistic)."""
    right = np.diag(sim)[:, None]
    ahead = (sim >= right).sum(axis=1) - 1  # minus the right answer itself
    return ahead


def retrieval_recall(scorer: Scorer, images: torch.Tensor, captions: Sequence[str],
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image-to-text and text-to-image recall at each K (caption i belongs to image i)."""
    sim = np.asarray(scorer(images, list(captions)), dtype=np.float64)
    i2t, t2i = _ranks(sim), _ranks(sim.T)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t < k).mean())
        out[f"t2i_r{k}"] = float((t2i < k).mean())
    return out


def zeroshot_accuracy(scorer: Scorer, images: torch.Tensor, labels: Sequence[int],
                      class_prompts: Sequence[Sequence[str]]) -> float:
    """Accuracy of classifying each image as the class whose prompts score highest on average."""
    n_prompts = {len(p) for p in class_prompts}
    if len(n_prompts) != 1:
        raise ValueError("every class needs the same number of prompts")
    p = n_prompts.pop()
    flat = [t for prompts in class_prompts for t in prompts]
    sim = np.asarray(scorer(images, flat), dtype=np.float64).reshape(len(images), len(class_prompts), p)
    pred = sim.mean(axis=2).argmax(axis=1)
    return float((pred == np.asarray(labels)).mean())


def zeroshot_prompts(shapes: Sequence[str], colours: Sequence[str]) -> tuple[list[list[str]], list[list[str]]]:
    """Prompts per shape class and per colour class (each ensembled over the other attribute)."""
    def prompt(c: str, s: str) -> str:
        return SINGLE_TEMPLATE.format(a=noun_phrase(c, s))

    return [[prompt(c, s) for c in colours] for s in shapes], [[prompt(c, s) for s in shapes] for c in colours]


def evaluate_scorer(scorer: Scorer, bench: ClipBenchmark) -> dict[str, float]:
    """All metrics of the module docstring, as one flat dict."""
    out = compositional_accuracy(scorer, bench)
    out.update({f"retrieval/{k}": v for k, v in
                retrieval_recall(scorer, bench.retrieval_images, bench.retrieval_captions).items()})
    shape_prompts, colour_prompts = zeroshot_prompts(bench.shapes, bench.colours)
    out["zeroshot/shape"] = zeroshot_accuracy(scorer, bench.zeroshot_images, bench.zeroshot_shapes, shape_prompts)
    out["zeroshot/colour"] = zeroshot_accuracy(scorer, bench.zeroshot_images, bench.zeroshot_colours, colour_prompts)
    return out


def chance_levels(bench: ClipBenchmark) -> dict[str, float]:
    """What a scorer without information gets on each metric of :func:`evaluate_scorer`."""
    out = {f"comp/{split}/{k}": 0.5 for split, sets in bench.compositional.items() for k in [*sets, "avg"]}
    n = len(bench.retrieval_captions)
    for k in (1, 5):
        out[f"retrieval/i2t_r{k}"] = out[f"retrieval/t2i_r{k}"] = min(1.0, k / n)
    out["zeroshot/shape"] = 1.0 / len(bench.shapes)
    out["zeroshot/colour"] = 1.0 / len(bench.colours)
    return out


# --------------------------------------------------------------------------- scorers


class OracleScorer:
    """Ground truth: 1 where the caption is true of the image's scene, else 0."""

    def __init__(self, bench: ClipBenchmark) -> None:
        self.scenes = bench.scenes

    def __call__(self, images: torch.Tensor, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(images), len(texts)))
        for i, img in enumerate(images):
            scene = self.scenes[image_key(img)]
            out[i] = [float(caption_true_of(scene, t)) for t in texts]
        return out


class RandomScorer:
    """Independent standard-normal scores (a scorer that knows nothing), seeded."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: torch.Tensor, texts: Sequence[str]) -> np.ndarray:
        return self.rng.standard_normal((len(images), len(texts)))


def model_scorer(model: nn.Module, tokenizer: Tokenizer, device: torch.device | str | None = None,
                 batch_size: int = 256) -> Scorer:
    """Cosine similarity of a CLIP model's image and text embeddings (``encode_image``/``encode_text``)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device

    @torch.no_grad()
    def score(images: torch.Tensor, texts: Sequence[str]) -> np.ndarray:
        was_training = model.training
        model.eval()
        try:
            img = torch.cat([model.encode_image(images[s: s + batch_size].to(dev), normalize=True)
                             for s in range(0, len(images), batch_size)])
            tokens = tokenizer(list(texts))
            txt = torch.cat([model.encode_text(tokens[s: s + batch_size].to(dev), normalize=True)
                             for s in range(0, len(tokens), batch_size)])
        finally:
            model.train(was_training)
        return (img @ txt.T).float().cpu().numpy()

    return score


# --------------------------------------------------------------------------- reporting

#: The metrics a method comparison shows by default, in order.
SUMMARY_METRICS = (
    *(f"comp/test/{k}" for k in NEGATIVE_KINDS), "comp/test/avg", "comp/combo/avg",
    "retrieval/i2t_r1", "retrieval/t2i_r1", "retrieval/i2t_r5", "zeroshot/shape", "zeroshot/colour",
)


def results_table(results: Mapping[str, Mapping[str, float]], metrics: Sequence[str] | None = None,
                  chance: Mapping[str, float] | None = None) -> str:
    """A markdown table: one row per metric, one column per method (and chance if given)."""
    methods = list(results)
    if metrics is None:
        present = set().union(*(r.keys() for r in results.values())) if results else set()
        metrics = [m for m in SUMMARY_METRICS if m in present] + sorted(present - set(SUMMARY_METRICS))
    head = ["metric", *methods] + (["chance"] if chance is not None else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for m in metrics:
        cells = [m] + [f"{results[meth][m]:.3f}" if m in results[meth] else "-" for meth in methods]
        if chance is not None:
            cells.append(f"{chance[m]:.3f}" if m in chance else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: Separates a method from its training seed in a run's name (``clip@1``): runs so named are
#: summarised per method over their seeds (``seed_summary``).
SEED_SEPARATOR = "@"


def seed_groups(results: Mapping[str, Mapping[str, float]]) -> dict[str, list[str]]:
    """Run names by method (the part before ``SEED_SEPARATOR``), in the order first seen."""
    groups: dict[str, list[str]] = {}
    for name in results:
        groups.setdefault(name.split(SEED_SEPARATOR, 1)[0], []).append(name)
    return groups


def seed_summary(results: Mapping[str, Mapping[str, float]],
                 metrics: Sequence[str] | None = None) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Per method (``seed_groups``) and metric: (mean, min, max) over its seeds' runs."""
    groups = seed_groups(results)
    if metrics is None:
        metrics = [m for m in SUMMARY_METRICS if all(m in r for r in results.values())]
    return {method: {m: (float(np.mean(v)), float(np.min(v)), float(np.max(v)))
                     for m in metrics for v in [[results[n][m] for n in names]]}
            for method, names in groups.items()}


def seed_table(results: Mapping[str, Mapping[str, float]], baseline: str | None = None,
               metrics: Sequence[str] | None = None) -> str:
    """A markdown table of ``seed_summary``: mean (min..max) per method, and for each other method
    its difference to ``baseline`` (default: the first method), seed by seed where both ran the
    same seeds: mean difference (min..max), so that a difference beyond the spread shows as such."""
    summary = seed_summary(results, metrics)
    methods = list(summary)
    baseline = baseline or methods[0]
    groups = seed_groups(results)
    seeds = {m: {n.split(SEED_SEPARATOR, 1)[1] if SEED_SEPARATOR in n else "": n for n in groups[m]} for m in methods}
    others = [m for m in methods if m != baseline]
    head = ["metric", *(f"{m} (n={len(groups[m])})" for m in methods), *(f"{m} - {baseline}" for m in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for metric in summary[baseline]:
        cells = [metric] + [f"{mean:.3f} ({lo:.3f}..{hi:.3f})" for mean, lo, hi in
                            (summary[m][metric] for m in methods)]
        for m in others:
            common = sorted(set(seeds[m]) & set(seeds[baseline]))
            diffs = [results[seeds[m][k]][metric] - results[seeds[baseline][k]][metric] for k in common]
            cells.append(f"{np.mean(diffs):+.3f} ({min(diffs):+.3f}..{max(diffs):+.3f})" if diffs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: Mapping[str, Mapping[str, float]], path: str | Path,
                 metrics: Sequence[str] | None = None, chance: Mapping[str, float] | None = None,
                 title: str = "CLIP methods on held-out compositional scenes") -> Path:
    """A grouped bar chart (PNG): metrics along x, one bar per method, chance as ticks."""
    with needs("train", "the evaluation's plots"):
        import matplotlib

        matplotlib.use("Agg")  # no display on the training machines
        import matplotlib.pyplot as plt

    if metrics is None:
        metrics = [m for m in SUMMARY_METRICS if all(m in r for r in results.values())]
    # Runs of several seeds (``clip@0``, ``clip@1``): one bar per method at the mean, the seeds' range as error bars.
    summary = seed_summary(results, metrics)
    methods = list(summary)
    x = np.arange(len(metrics))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.8 * len(metrics) + 2), 4.5))
    for j, meth in enumerate(methods):
        stats = [summary[meth][m] for m in metrics]
        means = [mean for mean, _, _ in stats]
        spread = np.array([[mean - lo for mean, lo, _ in stats], [hi - mean for mean, _, hi in stats]])
        seeds = len(seed_groups(results)[meth])
        ax.bar(x - 0.4 + width * (j + 0.5), means, width, label=meth if seeds == 1 else f"{meth} ({seeds} seeds)",
               yerr=spread if seeds > 1 else None, capsize=2)
    if chance is not None:
        for xi, m in zip(x, metrics, strict=True):
            if m in chance:
                ax.hlines(chance[m], xi - 0.45, xi + 0.45, colors="black", linestyles="dashed", linewidth=1,
                          label="chance" if xi == 0 else None)
    ax.set_xticks(x)
    ax.set_xticklabels(metrics, rotation=40, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy / recall")
    ax.set_title(title)
    # Outside the axes: inside, it hides the tops of the first or last bars.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    log.info("wrote %s", path)
    return path


def write_comparison(results: Mapping[str, Mapping[str, float]], out_dir: str | Path, name: str = "clip_methods",
                     chance: Mapping[str, float] | None = None,
                     metrics: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Write ``<name>.md`` (table) and ``<name>.png`` (bar chart) of several methods into ``out_dir``;
    runs named by seed (``clip@0``, ...) also get the per-method table over seeds (``seed_table``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{name}.md"
    text = results_table(results, metrics, chance)
    if any(len(names) > 1 for names in seed_groups(results).values()):
        text = seed_table(results, metrics=metrics) + "\n" + text
    md.write_text(text)
    png = plot_results(results, out / f"{name}.png", metrics, chance)
    return md, png
