"""The airbench recipe's parts (issue 16, part 3): whitening, weight averaging, test-time
augmentation, and the preset composing into a run. Its accuracy target is a GPU job
(scripts/gpu_check.sh); these check the parts do what their docstrings say."""
import math

import torch

from meta_llr.config import compose
from meta_llr.models import build_model
from meta_llr.run import build_run
from meta_llr.weight_average import WeightAverage


def test_whitening_stem_whitens_the_patches_and_is_frozen():
    torch.manual_seed(0)
    mix = torch.randn(12, 12) + 3 * torch.eye(12)   # correlated patches with large variances
    patches = torch.randn(4000, 12) @ mix
    x = patches.view(4000, 3, 2, 2)                  # 2x2 images: one patch each
    net = build_model("fastnet", 3, 32, 10, widths=[8], whiten=True)
    net.init_from_data(x)
    assert not net.stem.weight.requires_grad
    out = torch.nn.functional.conv2d(x, net.stem.weight).flatten(1)   # [N, 24]
    centered = out[:, :12] - out[:, :12].mean(0)
    covariance = centered.T @ centered / len(centered)
    centered_patches = patches - patches.mean(0)
    eigenvalues = torch.linalg.eigvalsh((centered_patches.T @ centered_patches / len(patches)).double()).flip(0)
    expected = torch.diag((eigenvalues / (eigenvalues + 5e-4)).float())   # whitened up to the eps
    torch.testing.assert_close(covariance, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[:, 12:], -out[:, :12])


def test_whitening_refuses_other_than_three_channels():
    import pytest
    from meta_llr.errors import UserError
    with pytest.raises(UserError, match="3-channel"):
        build_model("fastnet", 1, 8, 10, widths=[8], whiten=True)


def test_weight_average_follows_its_formula():
    flat, buffer = torch.zeros(3), torch.zeros(2)
    average = WeightAverage(flat, [buffer, torch.zeros(1, dtype=torch.long)], every=2, decay=0.9, total_steps=5)
    for done in range(1, 6):
        flat.add_(1.0)             # a step moves the weights by 1 and the buffer by 2
        buffer.add_(2.0)
        average.after_step(done)
    # done 2: slow = (1 - d2)·2 and the weights reset to it; done 4: the weights moved 2 more since;
    # done 5 (the last, not a multiple of 2): the weights reset to the average of done 4.
    d2, d4 = 0.9 ** 2 * (2 / 5) ** 3, 0.9 ** 2 * (4 / 5) ** 3
    s2 = (1 - d2) * 2.0
    s4 = d4 * s2 + (1 - d4) * (s2 + 2.0)
    torch.testing.assert_close(flat, torch.full((3,), s4))
    b2 = (1 - d2) * 4.0
    torch.testing.assert_close(buffer, torch.full((2,), d4 * b2 + (1 - d4) * (b2 + 4.0)))


def test_tta_levels_average_the_views():
    cfg = compose(["controller=uniform", "model=fastnet", "model.widths=[8]", "data=synthetic", "data.train_size=64",
                   "data.test_size=16", "trainer.epochs=1", "trainer.batch_size=32", "trainer.checkpoint=false",
                   "quiet=true", "trainer.tta=1"])
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        run = build_run(cfg, out)
        run.model.eval()
        x = run.normalize(run.eval_splits["test"][0][:4])
        with torch.no_grad():
            expected = 0.5 * (run.model(x) + run.model(x.flip(-1)))
            torch.testing.assert_close(run.tta_logits(x), expected)
            run.tta = 0
            torch.testing.assert_close(run.tta_logits(x), run.model(x))
            run.tta = 2
            level2 = run.tta_logits(x)
        assert level2.shape == expected.shape and not torch.allclose(level2, expected)


def test_airbench_recipe_composes_and_trains(tmp_path):
    cfg = compose(["+recipe=airbench", "model.widths=[8]", "data=synthetic", "data.train_size=96", "data.test_size=16",
                   "trainer.epochs=2", "trainer.batch_size=32", "trainer.checkpoint=false", "quiet=true"])
    assert cfg.model.name == "fastnet" and cfg.model.whiten and cfg.schedule.name == "onecycle"
    assert (cfg.trainer.ema_every, cfg.trainer.tta, cfg.trainer.label_smoothing, cfg.trainer.momentum) == (5, 2, 0.2, 0.85)
    run = build_run(cfg, tmp_path)
    summary = run.fit()
    assert summary["status"] == "finished" and math.isfinite(summary["final_test_loss"])
    assert run.weight_average is not None and torch.equal(run.flat_params, run.weight_average.slow)
