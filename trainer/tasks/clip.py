"""CLIP, NegCLIP and TripletCLIP training as a trainer task.

``switchml-train clip --method clip|negclip|tripletclip`` trains ``open_clip.model.CLIP``
built from a config (a small ViT and a small text transformer; nothing is downloaded) on
the procedural scenes of :mod:`trainer.data.scenes`, or on WebDataset shards / a CSV.

Objectives, for a batch of images I, captions T, hard negative captions T' and their
images I' (each row of a loss is a softmax cross-entropy over the candidates listed):

- ``clip``: L(I -> T) + L(T -> I), halved: open_clip's ClipLoss.
- ``negclip``: L(I -> T ∪ T') + L(T -> I), halved: the negative captions are extra text
  candidates for every image (NegCLIP, Yuksekgonul et al. 2023).
- ``tripletclip``: TripletCLIP's objective (Patel et al. 2024), default ``combined``:
  ½ [NegCLIP(I, T, T') + NegCLIP(I', T', T)]. The negative pairs form a second batch in
  which the roles swap: the negative image is the anchor of its negative caption and the
  original caption is its hard negative. ``--triplet-mode alternate`` instead takes the
  two halves on alternate steps (even: positive batch, odd: negative batch), which halves
  the image-encoder work per step. Where the positive caption is true of the negative
  image (add-att: ``HardNegative.symmetric`` is False), it is not used as that image's
  hard negative: the candidate is masked.

Across workers every loss gathers the features of all ranks with a differentiable
all_gather (:func:`gather_rows`) and computes each rank's rows
against all gathered candidates: open_clip's ``gather_with_grad=True, local_loss=True``.
Each rank's loss is then the mean over its own rows; DDP's averaging of gradients makes
the update that of the loss on the concatenated global batch, whatever carries the
gradient allreduce (the switch or the process group).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from switchml.extras import needs
from trainer.data.scenes import (
    DISTRACTORS,
    NEGATIVE_KINDS,
    CsvImageText,
    SceneConfig,
    SceneDataset,
    SceneGenerator,
    Tokenizer,
    WebDatasetShards,
    WordTokenizer,
    scene_vocabulary,
)
from trainer.eval.clip_metrics import (
    COMP_SPLITS,
    TRAIN_SPLIT,
    ClipBenchmark,
    build_benchmark,
    chance_levels,
    evaluate_scorer,
    model_scorer,
    write_comparison,
)
from trainer.tasks.base import Stage, StageContext, Task, warmup_cosine

log = logging.getLogger(__name__)

METHODS = ("clip", "negclip", "tripletclip")
TRIPLET_MODES = ("combined", "alternate")
DATASET_TYPES = ("synthetic", "webdataset", "csv")
#: Learning-rate schedules (the first is the default: the reference runs' constant rate).
LR_SCHEDULES = ("constant", "cosine")
#: open_clip clamps the learned temperature at 100 after every step; the loss clamps it.
MAX_LOGIT_SCALE = 100.0
#: File ``finish`` writes: the state dict with the spec needed to rebuild model and tokenizer.
CHECKPOINT_NAME = "clip_model.pt"


# --------------------------------------------------------------------------- model


@dataclass
class ClipSpec:
    """What rebuilds a trained model: its open_clip config, its tokenizer and its scenes.

    ``model_cfg`` is in open_clip's model-config format (``embed_dim``, ``vision_cfg``,
    ``text_cfg``), so a JSON config of a released open_clip model works as well.
    """

    model_cfg: dict[str, Any]
    tokenizer: str = "word"  #: ``word`` (closed vocabulary) or ``bpe`` (open_clip's SimpleTokenizer)
    vocab: list[str] | None = None  #: the word tokenizer's words, stored so a checkpoint decodes alike
    scene_seed: int = 0  #: the generator seed of the training scenes (evaluation uses its held-out splits)
    #: unmentioned objects per scene (``SceneConfig.distractors``); 0 in checkpoints older than the option
    distractors: int = 0
    method: str = "clip"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        size = self.model_cfg["vision_cfg"].get("image_size", 224)
        return int(size[0] if isinstance(size, list | tuple) else size)

    @property
    def context_length(self) -> int:
        return int(self.model_cfg["text_cfg"].get("context_length", 77))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClipSpec:
        return cls(**d)


def small_model_cfg(embed_dim: int = 64, image_size: int = 64, patch_size: int = 8, width: int = 64,
                    layers: int = 2, heads: int = 2, context_length: int = 24, vocab_size: int = 49408) -> dict[str, Any]:
    """An open_clip model config for a small ViT and text transformer of equal width."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": width, "layers": layers,
                       "head_width": width // heads},
        "text_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": width, "heads": heads,
                     "layers": layers},
    }


def build_tokenizer(spec: ClipSpec) -> Tokenizer:
    """The spec's tokenizer; neither kind downloads anything (open_clip ships its BPE vocabulary)."""
    if spec.tokenizer == "word":
        return WordTokenizer(spec.vocab, context_length=spec.context_length)
    if spec.tokenizer == "bpe":
        with needs("clip", "the clip task's BPE tokenizer"):
            from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer(context_length=spec.context_length)
    raise ValueError(f"unknown tokenizer {spec.tokenizer!r}")


def build_model(spec: ClipSpec) -> nn.Module:
    """``open_clip.model.CLIP`` from the spec's config, randomly initialised."""
    with needs("clip", "the clip task"):
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    cfg = spec.model_cfg
    return CLIP(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), CLIPTextCfg(**cfg["text_cfg"]),
                quick_gelu=cfg.get("quick_gelu", False))


def save_checkpoint(model: nn.Module, spec: ClipSpec, path: str | Path) -> Path:
    """Write ``{"state_dict", "clip_spec"}`` (open_clip's loader reads the state dict from it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "clip_spec": spec.to_dict()}, path)
    return path


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Tokenizer, ClipSpec]:
    """Model, tokenizer and spec from a checkpoint of :func:`save_checkpoint`.

    A bare state dict works too when a ``clip_spec.json`` lies beside it (``finish`` writes
    one), e.g. the trainer's own ``<out>/clip.pt``.
    """
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    spec = checkpoint_spec(path, ckpt)
    if spec is None:
        raise ValueError(f"{path} has no clip_spec and there is no clip_spec.json beside it")
    model = build_model(spec)
    model.load_state_dict(checkpoint_state(ckpt))
    return model.to(device), build_tokenizer(spec), spec


def checkpoint_spec(path: str | Path, ckpt: Any) -> ClipSpec | None:
    """The spec stored in a checkpoint, else the ``clip_spec.json`` beside it, else None."""
    if isinstance(ckpt, dict) and "clip_spec" in ckpt:
        return ClipSpec.from_dict(ckpt["clip_spec"])
    side = Path(path).parent / "clip_spec.json"
    return ClipSpec.from_dict(json.loads(side.read_text())) if side.is_file() else None


def checkpoint_state(ckpt: Any) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint: ours (``state_dict``), the trainer's
    (``<out>/clip.pt``: ``model``) or a bare one; DDP's ``module.`` prefix removed."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        state = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        state = ckpt["model"]
    else:
        state = ckpt
    return {k.removeprefix("module."): v for k, v in state.items()}


# --------------------------------------------------------------------------- loss


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; the backward returns this rank's rows of the summed gradient.

    Every rank computes a loss from all gathered rows, so the gradient of rank r's rows is
    the sum over ranks of their gradients for those rows: an all_reduce of the gathered
    gradient, sliced. (``torch.distributed.nn.all_gather`` does the same with one scatter
    per rank on Gloo and is deprecated in this torch.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:  # type: ignore[override]
        top = max(sizes)
        padded = F.pad(x, (0, 0, 0, top - x.shape[0])) if x.shape[0] < top else x.contiguous()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.offset, ctx.n = sum(sizes[:rank]), x.shape[0]
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.offset: ctx.offset + ctx.n], None, None


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of ``x`` concatenated in rank order, and where this rank's rows start.

    Differentiable: the backward sums every rank's gradient for this rank's rows. Ranks
    may hold different numbers of rows (a short last batch): sizes are exchanged first
    and rows padded to the largest for the collective.
    """
    rank, world = _world()
    if world == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_l = [int(s.item()) for s in sizes]
    return _GatherRows.apply(x, sizes_l, rank), sum(sizes_l[:rank])


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     extra_text_features: torch.Tensor | None = None,
                     extra_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's pairs against all ranks' candidates.

    Row i of the image-to-text term is image i against every rank's captions and, if
    given, every rank's ``extra_text_features`` (hard negative captions); row i of the
    text-to-image term is caption i against every rank's images. ``extra_valid[i] = False``
    removes extra caption i from image i's candidates (a "negative" that is true of it).
    Features must be L2-normalised; ``logit_scale`` is the temperature's inverse (exp'd).
    Returns the mean over this rank's rows of both terms, halved.
    """
    n = image_features.shape[0]
    all_img, offset = gather_rows(image_features)
    all_txt, _ = gather_rows(text_features)
    labels = torch.arange(offset, offset + n, device=image_features.device)
    candidates = all_txt
    if extra_text_features is not None:
        all_extra, _ = gather_rows(extra_text_features)
        candidates = torch.cat([all_txt, all_extra])
    logits_i2t = logit_scale * image_features @ candidates.T
    if extra_text_features is not None and extra_valid is not None:
        invalid = ~extra_valid.to(torch.bool)
        if invalid.any():
            cols = all_txt.shape[0] + labels  # extra caption i sits after all positive captions
            mask = torch.zeros_like(logits_i2t, dtype=torch.bool)
            mask[torch.arange(n, device=mask.device), cols] = invalid
            logits_i2t = logits_i2t.masked_fill(mask, float("-inf"))
    logits_t2i = logit_scale * text_features @ all_img.T
    return (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2


def method_loss(method: str, model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
                step: int = 0, triplet_mode: str = "combined") -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch under ``method`` (one forward call through ``model``, DDP-safe).

    The metrics leave the loss out: the trainer logs it itself (``loss=`` in its record).
    """
    img = batch["image"].to(device, non_blocking=True)
    txt = batch["text"].to(device, non_blocking=True)
    if method == "clip":
        img_f, txt_f, scale = model(img, txt)[:3]
        scale = scale.clamp(max=MAX_LOGIT_SCALE)
        loss = contrastive_loss(img_f, txt_f, scale)
        return loss, {"logit_scale": float(scale.detach())}
    if "neg_text" not in batch:
        raise ValueError(f"--method {method} needs hard negative captions in the data")
    neg_txt = batch["neg_text"].to(device, non_blocking=True)
    n = txt.shape[0]
    if method == "negclip":
        img_f, all_txt_f, scale = model(img, torch.cat([txt, neg_txt]))[:3]
        scale = scale.clamp(max=MAX_LOGIT_SCALE)
        loss = contrastive_loss(img_f, all_txt_f[:n], scale, all_txt_f[n:])
        return loss, {"logit_scale": float(scale.detach())}
    if method != "tripletclip":
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    if "neg_image" not in batch:
        raise ValueError("--method tripletclip needs hard negative images in the data")
    neg_img = batch["neg_image"].to(device, non_blocking=True)
    sym = batch.get("neg_symmetric")
    sym = sym.to(device) if sym is not None else torch.ones(n, dtype=torch.bool, device=device)
    if triplet_mode == "combined":
        img_f, txt_f, scale = model(torch.cat([img, neg_img]), torch.cat([txt, neg_txt]))[:3]
        scale = scale.clamp(max=MAX_LOGIT_SCALE)
        pos = contrastive_loss(img_f[:n], txt_f[:n], scale, txt_f[n:])
        # The negative batch: I' anchors T', and T is I''s hard negative where it is false of I'.
        neg = contrastive_loss(img_f[n:], txt_f[n:], scale, txt_f[:n], extra_valid=sym)
        loss = (pos + neg) / 2
        return loss, {"loss_pos": float(pos.detach()), "loss_neg": float(neg.detach()),
                      "logit_scale": float(scale.detach())}
    if triplet_mode != "alternate":
        raise ValueError(f"unknown triplet mode {triplet_mode!r}; known: {TRIPLET_MODES}")
    if step % 2 == 0:
        img_f, txt_f, scale = model(img, torch.cat([txt, neg_txt]))[:3]
        scale = scale.clamp(max=MAX_LOGIT_SCALE)
        loss = contrastive_loss(img_f, txt_f[:n], scale, txt_f[n:])
    else:
        img_f, txt_f, scale = model(neg_img, torch.cat([neg_txt, txt]))[:3]
        scale = scale.clamp(max=MAX_LOGIT_SCALE)
        loss = contrastive_loss(img_f, txt_f[:n], scale, txt_f[n:], extra_valid=sym)
    return loss, {"logit_scale": float(scale.detach()), "half": float(step % 2)}


# --------------------------------------------------------------------------- stage and task


class ClipStage(Stage):
    """One CLIP training stage (model, data, objective, held-out evaluation)."""

    name = "clip"
    default_steps = 2000
    default_batch_size = 64
    default_lr = 5e-4

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.method: str = args.method
        self.triplet_mode: str = args.triplet_mode
        self.spec = self._make_spec(args)
        self._step = 0
        self._bench: ClipBenchmark | None = None

    @staticmethod
    def _make_spec(args: argparse.Namespace) -> ClipSpec:
        synthetic = args.dataset_type == "synthetic"
        pretrained_spec = None
        if args.pretrained:
            # A checkpoint of this task carries (or sits beside) its spec: start from that
            # architecture and tokenizer unless a config is given.
            ckpt = torch.load(args.pretrained, map_location="cpu", weights_only=True)
            pretrained_spec = checkpoint_spec(args.pretrained, ckpt)
        if args.model_config:
            model_cfg = json.loads(Path(args.model_config).read_text())
            model_cfg = model_cfg.get("model_cfg", model_cfg)
        elif pretrained_spec is not None:
            model_cfg = pretrained_spec.model_cfg
        else:
            model_cfg = None
        tokenizer = args.tokenizer
        if tokenizer == "auto":
            if pretrained_spec is not None and not args.model_config:
                tokenizer = pretrained_spec.tokenizer
            else:
                # A closed vocabulary fits the scenes; real captions and external configs need BPE.
                tokenizer = "word" if synthetic and model_cfg is None else "bpe"
        vocab = None
        if tokenizer == "word":
            vocab = (pretrained_spec.vocab if pretrained_spec is not None and pretrained_spec.vocab
                     else scene_vocabulary())
        if model_cfg is None:
            vocab_size = WordTokenizer(vocab).vocab_size if tokenizer == "word" else 49408
            model_cfg = small_model_cfg(args.embed_dim, args.image_size, args.patch_size, args.width, args.layers,
                                        args.heads, args.context_length, vocab_size)
        return ClipSpec(model_cfg=model_cfg, tokenizer=tokenizer, vocab=vocab, scene_seed=args.scene_seed,
                        distractors=args.distractors,
                        method=args.method, extra={"triplet_mode": args.triplet_mode})

    # -- model

    def build_model(self, ctx: StageContext) -> nn.Module:
        model = build_model(self.spec)
        if self.args.pretrained:
            path = self.args.pretrained
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
                model.load_state_dict(checkpoint_state(ckpt))  # the trainer's own checkpoint
            else:
                with needs("clip", "the clip task's --pretrained loader"):
                    import open_clip

                # open_clip's loader: {"state_dict": ...} or bare, "module." stripped,
                # positional embeddings resized, third-party layouts converted.
                open_clip.load_checkpoint(model, path, strict=True)
            log.info("loaded %s", path)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("clip model: %d trainable parameters, method %s", n, self.method)
        return model.to(ctx.device)

    def tokenizer(self) -> Tokenizer:
        return build_tokenizer(self.spec)

    def generator(self) -> SceneGenerator:
        return scene_generator(self.spec.image_size, self.spec.scene_seed, self.spec.distractors)

    # -- data

    def train_dataset(self, ctx: StageContext) -> Dataset:
        a = self.args
        tok = self.tokenizer()
        wants_neg = self.method != "clip"
        if a.dataset_type == "synthetic":
            kinds = [k.strip() for k in a.negative_kinds.split(",") if k.strip()]
            return SceneDataset(self.generator(), "train", a.train_scenes, tok, negatives=wants_neg,
                                negative_images=self.method == "tripletclip", negative_kinds=kinds)
        if not a.train_data:
            raise ValueError(f"--dataset-type {a.dataset_type} needs --train-data")
        if a.dataset_type == "webdataset":
            ds = WebDatasetShards(a.train_data, tok, self.spec.image_size)
        else:
            ds = CsvImageText(a.train_data, tok, self.spec.image_size, img_key=a.csv_img_key,
                              caption_key=a.csv_caption_key, separator=a.csv_separator,
                              neg_caption_key=a.csv_neg_caption_key, neg_img_key=a.csv_neg_img_key)
        if wants_neg and not ds.has_negatives:
            raise ValueError(f"--method {self.method} needs hard negatives; {a.train_data} has none")
        return ds

    # -- objective

    def loss(self, model: nn.Module, batch: Any, ctx: StageContext) -> tuple[torch.Tensor, dict[str, float]]:
        # Every rank calls loss once per micro-batch, so the count (which half the
        # alternating mode takes) agrees across ranks without communication; with
        # --accumulate the halves alternate per micro-batch.
        step = self._step
        self._step += 1
        return method_loss(self.method, model, batch, ctx.device, step, self.triplet_mode)

    def optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        """AdamW; like open_clip, no weight decay on gains, biases and the temperature (1-d)."""
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.args.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def lr_scheduler(self, optimizer: torch.optim.Optimizer,
                     total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
        """open_clip's recipe with ``--lr-schedule cosine``: warm-up, then cosine decay to zero."""
        if self.args.lr_schedule == "constant":
            return None
        return warmup_cosine(optimizer, total_steps, min(self.args.warmup_steps, total_steps - 1))

    # -- evaluation and artefacts

    def benchmark(self) -> ClipBenchmark:
        """The held-out benchmark of this stage's generator (built once)."""
        if self._bench is None:
            n = self.args.eval_scenes
            self._bench = build_benchmark(self.generator(), n_per_kind=n, n_retrieval=min(n, 200))
        return self._bench

    def evaluate(self, model: nn.Module, ctx: StageContext) -> dict[str, float]:
        model = getattr(model, "module", model)
        metrics = evaluate_scorer(model_scorer(model, self.tokenizer(), ctx.device), self.benchmark())
        log.info("clip %s: comp/test/avg %.3f comp/combo/avg %.3f i2t_r1 %.3f", self.method,
                 metrics["comp/test/avg"], metrics["comp/combo/avg"], metrics["retrieval/i2t_r1"])
        return metrics

    def finish(self, model: nn.Module, ctx: StageContext) -> None:
        model = getattr(model, "module", model)
        save_checkpoint(model, self.spec, ctx.out_dir / CHECKPOINT_NAME)
        (ctx.out_dir / "clip_spec.json").write_text(json.dumps(self.spec.to_dict(), indent=1))


class ClipTask(Task):
    """Contrastive image-text training with optional TripletCLIP hard negatives."""

    name = "clip"
    help = "CLIP / NegCLIP / TripletCLIP on compositional scenes or image-text shards"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("clip")
        g.add_argument("--method", choices=METHODS, default="clip",
                       help="clip: image-text pairs; negclip: + hard negative captions; "
                            "tripletclip: + hard negative captions and their images")
        g.add_argument("--triplet-mode", choices=TRIPLET_MODES, default="combined",
                       help="tripletclip: both halves every step (combined) or one per step (alternate)")
        g.add_argument("--embed-dim", type=int, default=64, help="joint embedding size")
        g.add_argument("--image-size", type=int, default=64)
        g.add_argument("--patch-size", type=int, default=8)
        g.add_argument("--width", type=int, default=64, help="width of both towers")
        g.add_argument("--layers", type=int, default=2, help="transformer layers of both towers")
        g.add_argument("--heads", type=int, default=2, help="attention heads of both towers")
        g.add_argument("--context-length", type=int, default=24)
        g.add_argument("--tokenizer", choices=("auto", "word", "bpe"), default="auto",
                       help="auto: word-level for synthetic scenes, open_clip's BPE otherwise")
        g.add_argument("--model-config", default=None,
                       help="open_clip model config JSON (embed_dim, vision_cfg, text_cfg) instead of the size flags")
        g.add_argument("--pretrained", default=None, help="local open_clip checkpoint (state dict) to start from")
        g.add_argument("--weight-decay", type=float, default=0.1)
        g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=LR_SCHEDULES[0],
                       help="cosine: linear warm-up over --warmup-steps, then cosine decay to zero at the last "
                            "step (open_clip's); constant: --lr throughout")
        g.add_argument("--warmup-steps", type=int, default=100,
                       help="cosine: steps of linear warm-up (at most the run's steps - 1)")
        g.add_argument("--dataset-type", choices=DATASET_TYPES, default="synthetic")
        g.add_argument("--train-scenes", type=int, default=20000, help="synthetic: training scenes")
        g.add_argument("--scene-seed", type=int, default=0,
                       help="synthetic: generator seed (the same for every method, so they see the same data)")
        g.add_argument("--distractors", type=int, default=DISTRACTORS,
                       help="synthetic: objects in each scene that its caption does not mention, so that a bag of "
                            "words cannot tell a caption from its hard negatives (0: the first benchmark's scenes)")
        g.add_argument("--negative-kinds", default=",".join(NEGATIVE_KINDS),
                       help="synthetic: comma-separated hard negative kinds to train on")
        g.add_argument("--eval-scenes", type=int, default=200, help="held-out scenes per compositional category")
        g.add_argument("--train-data", default=None,
                       help="webdataset: shards ('a-{000..009}.tar', globs, '::'-separated); csv: the file")
        g.add_argument("--csv-img-key", default=None)
        g.add_argument("--csv-caption-key", default=None)
        g.add_argument("--csv-separator", default=None)
        g.add_argument("--csv-neg-caption-key", default=None)
        g.add_argument("--csv-neg-img-key", default=None)

    def stages(self, args: argparse.Namespace) -> list[Stage]:
        return [ClipStage(args)]

    @classmethod
    def add_eval_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--eval-scenes", type=int, default=200, help="held-out scenes per compositional category")
        parser.add_argument("--scene-seed", type=int, default=None, help="benchmark seed (default: the run's)")
        parser.add_argument("--distractors", type=int, default=None,
                            help="unmentioned objects per benchmark scene (default: the run's)")
        parser.add_argument("--train-split", action="store_true",
                            help="also score the compositional pairs of --eval-scenes training scenes "
                                 "(comp/train/*): as good as held-out scenes means the model has not learnt "
                                 "its training pairs (capacity or steps), far better means it overfits them")
        parser.add_argument("--device", default="cpu")
        parser.add_argument("--compare", action="append", default=[], metavar="[NAME=]RUN",
                            help="another run (folder or checkpoint) to evaluate beside --ckpt (which also takes "
                                 "NAME=RUN); repeatable. Runs named METHOD@SEED are also summarised per method "
                                 "over their seeds in the --report")
        parser.add_argument("--report", default=None,
                            help="folder for a markdown table and a bar chart (PNG) of the runs side by side")
        parser.add_argument("--report-name", default="clip_methods", help="file name stem of the report")

    def evaluate_checkpoint(self, args: argparse.Namespace) -> dict[str, Any]:
        """Metrics of ``--ckpt`` (flat), or with ``--compare`` of every run (``{name: metrics}``)."""
        runs: list[tuple[str | None, str]] = []
        for item in [args.ckpt, *(getattr(args, "compare", []) or [])]:
            name, sep, path = item.partition("=")
            runs.append((name, path) if sep and os.sep not in name else (None, item))
        evaluated = []
        for name, path in runs:
            metrics, spec = evaluate_clip_checkpoint(path, args.eval_scenes, args.device, args.scene_seed,
                                                     args.distractors, args.train_split)
            evaluated.append((name, Path(resolve_checkpoint(path)), spec, metrics))
        names = _run_names([(n, p, s) for n, p, s, _ in evaluated])
        results = {name: metrics for name, (*_, metrics) in zip(names, evaluated, strict=True)}
        if getattr(args, "report", None):
            spec = evaluated[0][2]
            seed = spec.scene_seed if args.scene_seed is None else args.scene_seed
            distractors = spec.distractors if args.distractors is None else args.distractors
            md, png = write_comparison(results, args.report, args.report_name, chance=chance_levels(
                _benchmark(spec.image_size, seed, args.eval_scenes, distractors, args.train_split)))
            log.info("wrote %s and %s", md, png)
        return results if len(results) > 1 else next(iter(results.values()))


def parse_clip_args(argv: Sequence[str] = ()) -> argparse.Namespace:
    """This task's options alone (tests and tools that build a stage without the trainer)."""
    parser = argparse.ArgumentParser(prog="clip")
    ClipTask.add_arguments(parser)
    return parser.parse_args(list(argv))


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file of a run folder (``clip_model.pt``, else the trainer's ``clip.pt``) or the file itself."""
    p = Path(path)
    if p.is_dir():
        for name in (CHECKPOINT_NAME, f"{ClipStage.name}.pt"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p} holds neither {CHECKPOINT_NAME} nor {ClipStage.name}.pt")
    if not p.is_file():
        raise FileNotFoundError(str(p))
    return p


_BENCHES: dict[tuple[int, int, int, int, bool], ClipBenchmark] = {}


def scene_generator(image_size: int, seed: int, distractors: int) -> SceneGenerator:
    """The scenes of a run: its image size, its generator seed and its distractors."""
    return SceneGenerator(SceneConfig(image_size=image_size, distractors=distractors), seed=seed)


def _benchmark(image_size: int, seed: int, eval_scenes: int, distractors: int,
               train_split: bool = False) -> ClipBenchmark:
    """The held-out benchmark for these settings (with ``train_split``, the training scenes'
    pairs too), built once per process (runs compared share it)."""
    key = (image_size, seed, eval_scenes, distractors, train_split)
    if key not in _BENCHES:
        gen = scene_generator(image_size, seed, distractors)
        splits = (*COMP_SPLITS, TRAIN_SPLIT) if train_split else COMP_SPLITS
        _BENCHES[key] = build_benchmark(gen, n_per_kind=eval_scenes, n_retrieval=min(eval_scenes, 200),
                                        splits=splits)
    return _BENCHES[key]


def evaluate_clip_checkpoint(path: str | Path, eval_scenes: int = 200, device: torch.device | str = "cpu",
                             scene_seed: int | None = None, distractors: int | None = None,
                             train_split: bool = False) -> tuple[dict[str, float], ClipSpec]:
    """All held-out metrics of a saved model (a run folder or a checkpoint file), and its spec.

    The benchmark comes from the checkpoint's own scene seed and distractors unless
    ``scene_seed`` or ``distractors`` is given: its ``test`` and ``combo`` splits are streams
    the training split never drew from. ``train_split`` adds ``comp/train/*``, the same
    pairs on the first ``eval_scenes`` training scenes.
    """
    model, tok, spec = load_checkpoint(resolve_checkpoint(path), device)
    bench = _benchmark(spec.image_size, spec.scene_seed if scene_seed is None else scene_seed, eval_scenes,
                       spec.distractors if distractors is None else distractors, train_split)
    return evaluate_scorer(model_scorer(model, tok, device), bench), spec


def _run_names(specs: Sequence[tuple[str | None, Path, ClipSpec]]) -> list[str]:
    """Names for compared runs: as given, else the method, else (when methods repeat) the folder."""
    names = [given or spec.method for given, _, spec in specs]
    return [n if names.count(n) == 1 or given else f"{n} ({path.parent.name})"
            for n, (given, path, _) in zip(names, specs, strict=True)]
