"""benchmarks/reference/clip_scenes_probe.py: the in-process sweep over training-set sizes runs every
objective on a data set of the size asked for and reports held-out accuracies."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("open_clip", reason="the clip extra (open_clip) is not installed")

from benchmarks.reference.clip_scenes_probe import main  # noqa: E402

TINY = ["--steps", "4", "--batch-size", "8", "--eval-every", "2", "--eval-scenes", "8", "--threads", "1"]


@pytest.mark.parametrize("method", ["clip", "tripletclip"])
def test_probe_trains_and_reports_every_eval_step(method):
    rows = main(["--method", method, "--train-scenes", "16", *TINY])
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        assert 0.0 <= row["comp/test/avg"] <= 1.0 and "zeroshot/colour" in row


def test_probe_needs_a_batch_the_data_set_can_fill():
    # 4 scenes cannot fill a batch of 8 (drop_last): a clear failure, not an endless loop
    with pytest.raises(ValueError, match="train-scenes"):
        main(["--method", "clip", "--train-scenes", "4", *TINY])
