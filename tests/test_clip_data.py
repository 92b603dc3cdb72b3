"""The compositional scene generator, its hard negatives, the real-data loaders and the metrics.

Pixel checks are rule-based and independent of the generator's own parser: a caption is
read with a regular expression of the template language, objects are found by their exact
RGB value (the renderer draws without anti-aliasing), and relations and sizes are read off
the pixel masks' centroids and extents.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.scenes import (
    _MIN_SEP,
    BACKGROUND,
    COLOURS,
    DISTRACTORS,
    HELD_OUT,
    MAX_DISTRACTORS,
    NEGATIVE_KINDS,
    SHAPES,
    SIZES,
    CsvImageText,
    SceneConfig,
    SceneDataset,
    SceneGenerator,
    WebDatasetShards,
    WordTokenizer,
    caption_true_of,
    image_to_tensor,
    render_scene,
)
from trainer.eval.clip_metrics import (
    OracleScorer,
    RandomScorer,
    build_benchmark,
    chance_levels,
    evaluate_scorer,
    image_key,
    results_table,
    seed_summary,
    seed_table,
    write_comparison,
    zeroshot_prompts,
)

torch.set_num_threads(1)

_CAPTION = re.compile(
    r"^(a photo of |there is )?an? (?:(small|large) )?(\w+) (\w+) "
    r"(to the left of|to the right of|above|below) an? (?:(small|large) )?(\w+) (\w+)$"
)
_REL = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}


def read_caption(text: str) -> dict:
    """The caption's fields by a regular expression of the template language."""
    m = _CAPTION.match(text)
    assert m, f"caption outside the template language: {text!r}"
    prefix, size_a, col_a, shape_a, rel, size_b, col_b, shape_b = m.groups()
    return {"prefix": prefix or "", "size_a": size_a, "col_a": col_a, "shape_a": shape_a, "rel": _REL[rel],
            "size_b": size_b, "col_b": col_b, "shape_b": shape_b}


def pixel_objects(img: Image.Image) -> dict[str, tuple[float, float, int]]:
    """Colour name -> (centroid x, centroid y, extent in pixels) of every non-background colour."""
    arr = np.asarray(img)
    found = {}
    seen = np.all(arr == BACKGROUND, axis=-1)
    for name, rgb in COLOURS.items():
        mask = np.all(arr == rgb, axis=-1)
        seen |= mask
        if mask.any():
            ys, xs = np.nonzero(mask)
            extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
            found[name] = (xs.mean(), ys.mean(), int(extent))
    assert seen.all(), "pixels of a colour that is neither background nor an object colour"
    return found


def pixels_agree(img: Image.Image, caption: str) -> bool:
    """Whether the image shows the caption's colours, relation and named sizes."""
    f = read_caption(caption)
    objs = pixel_objects(img)
    if set(objs) != {f["col_a"], f["col_b"]}:
        return False
    (xa, ya, ea), (xb, yb, eb) = objs[f["col_a"]], objs[f["col_b"]]
    dx, dy = xb - xa, yb - ya
    rel_ok = {"left": dx > 0 and abs(dx) > abs(dy), "right": dx < 0 and abs(dx) > abs(dy),
              "above": dy > 0 and abs(dy) > abs(dx), "below": dy < 0 and abs(dy) > abs(dx)}[f["rel"]]
    # Extent of a small object is at most 2 * 0.10 * 64 + 1 = 13.8 px, of a large one at
    # least 2 * 0.85 * 0.16 * 64 = 17.4 px (the square): 15.5 px tells them apart.
    size_ok = all(size is None or (ext > 15.5) == (size == "large")
                  for size, ext in ((f["size_a"], ea), (f["size_b"], eb)))
    return rel_ok and size_ok


def bag_of_words(bench):
    """A scorer that counts the caption's colour and shape words found anywhere in the image's scene."""
    def score(images, texts):
        truth = [bench.scenes[image_key(img)] for img in images]
        out = np.zeros((len(images), len(texts)))
        for i, scene in enumerate(truth):
            words = {w for o in scene.objects for w in (o.colour, o.shape)}
            for j, t in enumerate(texts):
                out[i, j] = len(words & set(t.split()))
        return out
    return score


@pytest.fixture(scope="module")
def gen() -> SceneGenerator:
    """The first benchmark's scenes: two objects, both named (the pixel checks find objects by colour)."""
    return SceneGenerator(SceneConfig(image_size=64, distractors=0), seed=11)


@pytest.fixture(scope="module")
def dgen() -> SceneGenerator:
    """Scenes with the default distractor: two named objects and one more."""
    return SceneGenerator(SceneConfig(image_size=64), seed=11)


def test_distractors_are_unmentioned_objects_of_colours_and_shapes_the_caption_does_not_name(dgen):
    assert dgen.config.distractors == DISTRACTORS == 1
    for split in ("train", "test", "combo"):
        for i in range(60):
            sample = dgen.sample(split, i)
            scene = sample.scene
            assert len(scene.objects) == 3 and len(scene.distractors) == 1
            f = read_caption(sample.caption)  # the caption names the first two objects only
            (d,) = scene.distractors
            assert d.colour not in (f["col_a"], f["col_b"]) and d.shape not in (f["shape_a"], f["shape_b"])
            found = pixel_objects(dgen.render(scene))  # all three drawn, none covering another's colour
            assert set(found) == {f["col_a"], f["col_b"], d.colour}, (split, i)
            centres = [(o.x, o.y) for o in scene.objects]
            assert all(np.hypot(p[0] - q[0], p[1] - q[1]) >= _MIN_SEP
                       for k, p in enumerate(centres) for q in centres[k + 1:]), (split, i)  # no two touch
            assert caption_true_of(scene, sample.caption)


def test_hard_negatives_bind_words_that_name_something_in_the_image(dgen):
    """With a distractor, replace-att and replace-obj take its colour or shape: the new word is
    in the image, only bound to the wrong object; every negative keeps the distractor."""
    for split in ("train", "combo"):
        for i in range(150):
            sample = dgen.sample(split, i)
            (d,) = sample.scene.distractors
            assert set(sample.negatives) == set(NEGATIVE_KINDS), (split, i)
            p = read_caption(sample.caption)
            for kind, neg in sample.negatives.items():
                assert neg.scene.distractors == (d,), (split, i, kind)  # the distractor stays put
                n = read_caption(neg.caption)
                if kind == "replace-att":
                    assert {n["col_a"], n["col_b"]} - {p["col_a"], p["col_b"]} == {d.colour}
                elif kind == "replace-obj":
                    assert {n["shape_a"], n["shape_b"]} - {p["shape_a"], p["shape_b"]} == {d.shape}
                assert not caption_true_of(sample.scene, neg.caption), (split, i, kind)
                assert caption_true_of(neg.scene, neg.caption), (split, i, kind)
                assert caption_true_of(neg.scene, sample.caption) == (kind == "add-att")
                centres = [(o.x, o.y) for o in neg.scene.objects]
                assert all(np.hypot(a[0] - b[0], a[1] - b[1]) >= _MIN_SEP
                           for k, a in enumerate(centres) for b in centres[k + 1:]), (split, i, kind)


def test_a_bag_of_words_cannot_tell_a_caption_from_its_replacements_once_scenes_have_distractors():
    """The first benchmark's replace-att and replace-obj name a colour or shape absent from the
    image, which word overlap catches (1.0); with a distractor they tie (0.5), as the swaps do."""
    for distractors, replaced in ((0, 1.0), (1, 0.5)):
        bench = build_benchmark(SceneGenerator(SceneConfig(distractors=distractors), seed=4), n_per_kind=60,
                                n_retrieval=20)
        m = evaluate_scorer(bag_of_words(bench), bench)
        assert m["comp/test/swap-att"] == m["comp/test/swap-obj"] == 0.5
        assert m["comp/test/replace-att"] == m["comp/test/replace-obj"] == replaced, (distractors, m)
        assert evaluate_scorer(OracleScorer(bench), bench)["comp/test/avg"] == 1.0


def test_distractors_out_of_range_are_refused():
    for bad in (-1, MAX_DISTRACTORS + 1):
        with pytest.raises(ValueError, match=f"distractors={bad}; expected 0..{MAX_DISTRACTORS}"):
            SceneConfig(distractors=bad)


def test_captions_describe_their_images(gen):
    for split in ("train", "test", "combo"):
        for i in range(40):
            sample = gen.sample(split, i)
            img = gen.render(sample.scene)
            assert pixels_agree(img, sample.caption), (split, i, sample.caption)
            for kind, neg in sample.negatives.items():
                neg_img = gen.render(neg.scene)
                assert pixels_agree(neg_img, neg.caption), (split, i, kind, neg.caption)
                if kind in ("swap-att", "replace-att", "replace-rel", "add-att"):
                    # Kinds that change a colour, the layout or a named size are visible to
                    # this colour-position-size check; the negative caption must fail it.
                    assert not pixels_agree(img, neg.caption), (split, i, kind, neg.caption)


def test_pixel_check_can_fail(gen):
    sample = gen.sample("train", 0)
    f = read_caption(sample.caption)
    opposite = {"left": "to the right of", "right": "to the left of", "above": "below", "below": "above"}
    words = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
    wrong = sample.caption.replace(words[f["rel"]], opposite[f["rel"]])
    assert not pixels_agree(gen.render(sample.scene), wrong)


def test_hard_negatives_differ_exactly_as_intended(gen):
    fields = ("prefix", "size_a", "col_a", "shape_a", "rel", "size_b", "col_b", "shape_b")
    for i in range(150):
        sample = gen.sample("train", i)
        assert set(sample.negatives) == set(NEGATIVE_KINDS), i
        p = read_caption(sample.caption)
        for kind, neg in sample.negatives.items():
            n = read_caption(neg.caption)
            diff = {k for k in fields if p[k] != n[k]}
            if kind == "swap-att":
                assert diff == {"col_a", "col_b"} and (n["col_a"], n["col_b"]) == (p["col_b"], p["col_a"])
            elif kind == "swap-obj":
                assert diff == {"shape_a", "shape_b"} and (n["shape_a"], n["shape_b"]) == (p["shape_b"], p["shape_a"])
            elif kind == "replace-obj":
                assert len(diff) == 1 and diff <= {"shape_a", "shape_b"}
                assert n[diff.pop()] not in (p["shape_a"], p["shape_b"])
            elif kind == "replace-att":
                assert len(diff) == 1 and diff <= {"col_a", "col_b"}
                assert n[diff.pop()] not in (p["col_a"], p["col_b"])
            elif kind == "replace-rel":
                assert diff == {"rel"}
            elif kind == "add-att":
                assert len(diff) == 1 and diff <= {"size_a", "size_b"}
                key = diff.pop()
                assert p[key] is None and n[key] in SIZES
                true_size = sample.scene.objects[0 if key == "size_a" else 1].size
                assert n[key] != true_size, "an added attribute must be false of the image"
            # Meaning: the negative is false of the positive scene and true of its own scene;
            # only add-att's positive caption stays true of the negative scene.
            assert not caption_true_of(sample.scene, neg.caption), (i, kind)
            assert caption_true_of(neg.scene, neg.caption), (i, kind)
            assert caption_true_of(neg.scene, sample.caption) == (not neg.symmetric) == (kind == "add-att")
            # The negative image is the positive with the same edit: positions move only for replace-rel.
            moved = [(o.x, o.y) != (q.x, q.y) for o, q in zip(sample.scene.objects, neg.scene.objects, strict=True)]
            assert any(moved) == (kind == "replace-rel"), (i, kind)


def test_deterministic_by_seed_and_independent_of_order():
    a, b, c = SceneGenerator(seed=5), SceneGenerator(seed=5), SceneGenerator(seed=6)
    later = [b.sample("train", i) for i in (9, 3, 0)]  # a different order of calls
    assert [a.sample("train", i) for i in (9, 3, 0)] == later
    assert np.array_equal(np.asarray(a.render(a.sample("combo", 4).scene)),
                          np.asarray(b.render(b.sample("combo", 4).scene)))
    assert [a.sample("train", i).caption for i in range(20)] != [c.sample("train", i).caption for i in range(20)]
    assert [a.sample("train", i).caption for i in range(20)] != [a.sample("test", i).caption for i in range(20)]
    tok = WordTokenizer()
    da, db = SceneDataset(a, "train", 10, tok), SceneDataset(b, "train", 10, tok)
    for i in (0, 7):
        ia, ib = da[i], db[i]
        assert ia.keys() == ib.keys()
        assert all(torch.equal(ia[k], ib[k]) for k in ia)


def test_held_out_combinations_never_in_training():
    gen = SceneGenerator(seed=2)
    held = set(HELD_OUT)
    seen = set()
    for i in range(1500):
        sample = gen.sample("train", i)
        for scene in (sample.scene, *(n.scene for n in sample.negatives.values())):
            pairs = {(o.colour, o.shape) for o in scene.objects}
            assert not pairs & held, (i, pairs & held)
            seen |= pairs
    # Every colour and every shape is still trained on; the gap is only in their pairing.
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)
    for i in range(200):
        assert {(o.colour, o.shape) for o in gen.sample("combo", i).scene.objects} & held
        assert not {(o.colour, o.shape) for o in gen.sample("test", i).scene.objects} & held


def test_scene_dataset_items_and_tokenizer(gen):
    tok = WordTokenizer(context_length=24)
    ds = SceneDataset(gen, "train", 50, tok)
    item = ds[3]
    assert item["image"].shape == item["neg_image"].shape == (3, 64, 64)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["text"].shape == item["neg_text"].shape == (24,)
    sample = gen.sample("train", 3)
    assert tok.decode(item["text"].tolist()) == sample.caption
    kind = NEGATIVE_KINDS[int(item["neg_kind"])]
    assert tok.decode(item["neg_text"].tolist()) == sample.negatives[kind].caption
    assert bool(item["neg_symmetric"]) == (kind != "add-att")
    assert torch.equal(item["neg_image"], image_to_tensor(gen.render(sample.negatives[kind].scene)))
    assert {NEGATIVE_KINDS[int(ds[i]["neg_kind"])] for i in range(50)} == set(NEGATIVE_KINDS)
    only = SceneDataset(gen, "train", 20, tok, negative_kinds=["replace-rel"], negative_images=False)
    assert all(int(only[i]["neg_kind"]) == NEGATIVE_KINDS.index("replace-rel") for i in range(20))
    assert "neg_image" not in only[0]
    assert set(SceneDataset(gen, "train", 5, tok, negatives=False)[0]) == {"image", "text"}
    # open_clip's text tower pools at the largest id: the end token must be it.
    ids = tok(["a red circle to the left of a blue square"])[0]
    assert int(ids.argmax()) == len(tok.encode("a red circle to the left of a blue square")) + 1
    assert ids.max() == tok.vocab_size - 1
    unk = tok.index[tok.UNK]
    shape_p, colour_p = zeroshot_prompts(SHAPES, tuple(COLOURS))
    for text in [*sum(shape_p, []), *sum(colour_p, [])]:
        assert unk not in tok(text)[0].tolist(), text


def test_bpe_tokenizer_works_offline():
    from open_clip.tokenizer import SimpleTokenizer

    ids = SimpleTokenizer(context_length=24)(["an orange star above a small red square"])
    assert ids.shape == (1, 24) and int(ids[0, 0]) == 49406 and 49407 in ids[0].tolist()


def _png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path, gen):
    tok = WordTokenizer()
    samples = [gen.sample("train", i) for i in range(6)]
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:03d}.tar", "w") as tar:
            for j in range(3):
                s = samples[3 * shard + j]
                key = f"sub/s{shard}_{j:04d}"
                neg = s.negatives["swap-att"]
                _add(tar, f"{key}.png", _png(gen.render(s.scene)))
                _add(tar, f"{key}.txt", s.caption.encode())
                _add(tar, f"{key}.neg.txt", neg.caption.encode())
                _add(tar, f"{key}.neg.png", _png(gen.render(neg.scene)))
            _add(tar, "orphan.txt", b"no image")
    ds = WebDatasetShards(str(tmp_path / "shard-{000..001}.tar"), tok, image_size=64)
    assert len(ds) == 6 and ds.has_negatives
    for i, s in enumerate(samples):
        item = ds[i]
        assert torch.equal(item["image"], image_to_tensor(gen.render(s.scene)))
        assert torch.equal(item["text"], tok([s.caption])[0])
        assert torch.equal(item["neg_text"], tok([s.negatives["swap-att"].caption])[0])
        assert torch.equal(item["neg_image"], image_to_tensor(gen.render(s.negatives["swap-att"].scene)))
    # A gzip-compressed shard with JPEG images and no negatives, larger images resized.
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        _add(tar, "k1.jpg", _png(render_scene(samples[0].scene, 96), "JPEG"))
        _add(tar, "k1.txt", samples[0].caption.encode())
    (tmp_path / "z.tar.gz").write_bytes(gzip.compress(raw.getvalue()))
    dz = WebDatasetShards([str(tmp_path / "z.tar.gz")], tok, image_size=64)
    assert len(dz) == 1 and not dz.has_negatives
    assert dz[0]["image"].shape == (3, 64, 64) and set(dz[0]) == {"image", "text"}


def test_csv_image_text(tmp_path, gen):
    tok = WordTokenizer()
    rows = []
    for i in range(4):
        s = gen.sample("test", i)
        gen.render(s.scene).save(tmp_path / f"img{i}.png")
        rows.append({"filepath": f"img{i}.png", "title": s.caption})
    with open(tmp_path / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filepath", "title"], delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    ds = CsvImageText(tmp_path / "train.csv", tok, image_size=64)
    assert len(ds) == 4 and not ds.has_negatives
    assert torch.equal(ds[2]["image"], image_to_tensor(gen.render(gen.sample("test", 2).scene)))
    assert torch.equal(ds[2]["text"], tok([rows[2]["title"]])[0])
    with open(tmp_path / "other.csv", "w", newline="") as f:
        f.write("caption,image\n" + "\n".join(f'"{r["title"]}",{r["filepath"]}' for r in rows) + "\n")
    assert torch.equal(CsvImageText(tmp_path / "other.csv", tok)[1]["text"], tok([rows[1]["title"]])[0])


# --------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def bench():
    return build_benchmark(SceneGenerator(SceneConfig(distractors=0), seed=4), n_per_kind=120, n_retrieval=80)


def test_oracle_scores_one(bench):
    metrics = evaluate_scorer(OracleScorer(bench), bench)
    assert len(metrics) == 20
    assert all(v == 1.0 for v in metrics.values()), metrics


def test_the_train_split_scores_the_training_scenes_on_request():
    gen = SceneGenerator(SceneConfig(), seed=4)
    bench = build_benchmark(gen, n_per_kind=12, n_retrieval=8, splits=("test", "combo", "train"))
    assert list(bench.compositional) == ["test", "combo", "train"]
    train = bench.compositional["train"]
    # the pairs are those of the scenes a SceneDataset of the training split serves, index by index
    dataset = SceneDataset(gen, "train", 12, WordTokenizer(), negatives=False)
    want = {image_key(dataset[i]["image"]) for i in range(12)}
    assert {image_key(img) for pairs in train.values() for img in pairs.images} == want
    assert len(train["swap-att"]) == 12 and train["swap-att"].positives[0] == gen.sample("train", 0).caption
    metrics = evaluate_scorer(OracleScorer(bench), bench)
    assert metrics["comp/train/avg"] == 1.0 and chance_levels(bench)["comp/train/avg"] == 0.5
    default = build_benchmark(gen, n_per_kind=12, n_retrieval=8)
    assert list(default.compositional) == ["test", "combo"]  # held-out only unless asked
    assert torch.equal(default.compositional["test"]["swap-att"].images, bench.compositional["test"]["swap-att"].images)
    for bad in (("test", "zeroshot"), ()):
        with pytest.raises(ValueError, match="splits must be some of"):
            build_benchmark(gen, n_per_kind=2, n_retrieval=2, splits=bad)


def test_random_scores_about_chance(bench):
    metrics = evaluate_scorer(RandomScorer(0), bench)
    chance = chance_levels(bench)
    assert metrics.keys() == chance.keys()
    for key, value in metrics.items():
        # Standard errors: 0.046 for 120 pairs, 0.044 for 72 zero-shot images (p=1/6).
        tol = 0.035 if key.endswith("/avg") else 0.15
        assert abs(value - chance[key]) <= tol, (key, value, chance[key])


def test_metrics_detect_a_bag_of_words_scorer(bench):
    """Word overlap ignores order: swaps tie (0.5), replacements are caught, and the
    inverted oracle scores 0, so the metrics respond to what a scorer gets wrong."""
    oracle = OracleScorer(bench)
    m = evaluate_scorer(bag_of_words(bench), bench)
    assert m["comp/test/swap-att"] == m["comp/test/swap-obj"] == 0.5
    assert m["comp/test/replace-att"] == m["comp/test/replace-obj"] == 1.0
    inverted = evaluate_scorer(lambda i, t: -oracle(i, t), bench)
    assert inverted["comp/test/avg"] == 0.0 and inverted["retrieval/i2t_r1"] == 0.0


def test_runs_of_several_seeds_are_summarised_per_method_with_their_spread(tmp_path, bench):
    results = {"clip@0": {"comp/test/avg": 0.60}, "clip@1": {"comp/test/avg": 0.64},
               "tripletclip@0": {"comp/test/avg": 0.70}, "tripletclip@1": {"comp/test/avg": 0.80}}
    assert seed_summary(results)["tripletclip"]["comp/test/avg"] == pytest.approx((0.75, 0.70, 0.80))
    lines = seed_table(results).strip().splitlines()
    assert lines[0] == "| metric | clip (n=2) | tripletclip (n=2) | tripletclip - clip |"
    # seed by seed: +0.10 at seed 0, +0.16 at seed 1
    assert lines[2] == "| comp/test/avg | 0.620 (0.600..0.640) | 0.750 (0.700..0.800) | +0.130 (+0.100..+0.160) |"
    md, png = write_comparison(results, tmp_path, chance=chance_levels(bench))
    assert md.read_text().startswith(seed_table(results)) and png.stat().st_size > 1000


def test_table_and_chart(tmp_path, bench):
    results = {"clip": {"comp/test/avg": 0.61, "zeroshot/shape": 0.5},
               "tripletclip": {"comp/test/avg": 0.74, "zeroshot/shape": 0.55}}
    table = results_table(results, chance=chance_levels(bench))
    lines = table.strip().splitlines()
    assert lines[0] == "| metric | clip | tripletclip | chance |"
    assert "| comp/test/avg | 0.610 | 0.740 | 0.500 |" in lines
    md, png = write_comparison(results, tmp_path, chance=chance_levels(bench))
    assert md.read_text() == table
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
