"""The airbench recipe's parts (issue 16, part 3): whitening, weight averaging, test-time
augmentation, and the preset composing into a run. Its accuracy target is a GPU job
(scripts/gpu_check.sh); these check the parts do what their docstrings say."""
import math

import pytest
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


def test_whitening_stem_has_a_bias_and_no_batchnorm():
    net = build_model("fastnet", 3, 32, 10, widths=[8], whiten=True)
    assert isinstance(net.stem_bn, torch.nn.Identity) and net.stem.bias is not None
    assert torch.equal(net.stem.bias, torch.zeros(24)) and net.stem.bias.requires_grad
    plain = build_model("fastnet", 3, 32, 10, widths=[8])
    assert isinstance(plain.stem_bn, torch.nn.BatchNorm2d) and plain.stem.bias is None


def test_whitening_refuses_other_than_three_channels():
    from meta_llr.errors import UserError
    with pytest.raises(UserError, match="3-channel"):
        build_model("fastnet", 1, 8, 10, widths=[8], whiten=True)


def test_weight_average_follows_its_formula():
    flat, buffer = torch.zeros(3), torch.zeros(2)
    average = WeightAverage(flat, [buffer, torch.zeros(1, dtype=torch.long)], every=2, decay=0.9, total_steps=7,
                            start=1, steps_per_epoch=3)
    values = []
    for done in range(1, 8):
        flat.add_(1.0)             # a step moves the weights by 1 and the buffer by 2
        buffer.add_(2.0)
        average.after_step(done)
        values.append((float(flat[0]), float(buffer[0])))
    # done 1: before the start (the first multiple of 2 at or after step 1); done 2: slow = θ;
    # done 3: an epoch's end, θ back to slow; done 4 and 6: the formula; done 7: the last, reset.
    d4, d6 = 0.9 ** 2 * (4 / 7) ** 3, 0.9 ** 2 * (6 / 7) ** 3
    s4 = d4 * 2.0 + (1 - d4) * 3.0          # θ was reset to 2 at done 3, then moved 1
    s6 = d6 * s4 + (1 - d6) * (s4 + 2.0)    # done 5 is no reset: not an epoch's end
    assert [v[0] for v in values] == pytest.approx([1.0, 2.0, 2.0, s4, s4 + 1, s6, s6])
    b4 = d4 * 4.0 + (1 - d4) * 6.0
    b6 = d6 * b4 + (1 - d6) * (b4 + 4.0)
    assert [v[1] for v in values] == pytest.approx([2.0, 4.0, 4.0, b4, b4 + 2, b6, b6])


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
            size = x.shape[-1]

            def shift(image, d):  # out[i, j] = image[i + d, j + d], reflected at the borders
                index = torch.arange(size) + d
                index = torch.where(index < 0, -index, torch.where(index >= size, 2 * size - 2 - index, index))
                return image[..., index, :][..., index]

            views = [shift(x, -1), shift(x, 1)]
            translated = torch.stack([0.5 * (run.model(v) + run.model(v.flip(-1))) for v in views]).mean(0)
            torch.testing.assert_close(level2, 0.5 * expected + 0.5 * translated)


def test_alternate_flip_mirrors_each_image_the_other_way_every_odd_epoch(tmp_path):
    cfg = compose(["controller=uniform", "data=synthetic", "data.train_size=64", "data.test_size=16",
                   "data.augment.crop_pad=0", "data.augment.alternate_flip=true", "model=mlp", "quiet=true",
                   "trainer.checkpoint=false"])
    run = build_run(cfg, tmp_path)
    index = torch.arange(64)
    views = []
    for epoch in range(3):
        run.epoch = epoch
        views.append(run.augment(index, run.gen))
    x = run.train_x
    assert torch.equal(views[1], torch.where(run.flip_coins[:, None, None, None], x, x.flip(-1)))
    assert torch.equal(views[0], views[2]) and torch.equal(views[0].flip(-1), views[1])
    assert 10 < int(run.flip_coins.sum()) < 54   # the first orientation is a coin per image


def test_reflect_padding_wider_than_the_image_is_one_line(tmp_path):
    from meta_llr.errors import UserError
    cfg = compose(["controller=uniform", "data=synthetic", "data.size=8", "data.train_size=16", "data.test_size=8",
                   "data.augment.crop_pad=8", "data.augment.pad_mode=reflect", "model=mlp", "quiet=true",
                   "trainer.checkpoint=false"])
    with pytest.raises(UserError) as error:
        build_run(cfg, tmp_path)
    message = str(error.value)
    assert "\n" not in message and message.startswith("data.augment.crop_pad=8 with pad_mode=reflect")
    assert "pad_mode=zeros" in message


def test_airbench_recipe_trains_the_whitening_bias_three_epochs_and_boosts_batchnorm_shifts(tmp_path):
    cfg = compose(["+recipe=airbench", "model.widths=[8]", "data=synthetic", "data.train_size=64", "data.test_size=16",
                   "trainer.epochs=5", "trainer.batch_size=32", "trainer.checkpoint=false", "quiet=true",
                   "trainer.ema_start=2"])
    assert cfg.model.name == "fastnet" and cfg.model.whiten and cfg.schedule.name == "onecycle"
    assert (cfg.trainer.ema_every, cfg.trainer.tta, cfg.trainer.label_smoothing, cfg.trainer.momentum) == (5, 2, 0.2, 0.85)
    augment = cfg.data.augment
    assert (cfg.trainer.norm_lr_mult, augment.pad_mode, augment.alternate_flip, cfg.trainer.ema_start) == (64, "reflect",
                                                                                                          True, 2)
    run = build_run(cfg, tmp_path)
    lrs = {name: run.flat_step.param_lrs(torch.ones(len(run.layers)), 1.0)[p]
           for name, p in run.model.named_parameters() if p.requires_grad}
    assert lrs["stem.bias"] == 1.0 and lrs["groups.0.bn1.bias"] == 64.0 and lrs["groups.0.conv1.weight"] == 1.0
    bias, seen = run.model.stem.bias, []
    start = run.model.epoch_start
    run.model.epoch_start = lambda epoch: (seen.append(bias.detach().clone()), start(epoch))
    summary = run.fit()
    assert summary["status"] == "finished" and math.isfinite(summary["final_test_loss"])
    assert len(seen) == 5 and not torch.equal(seen[0], seen[3])   # trained in epochs 0-2
    # frozen from epoch 3: the average, started in epoch 2 (step 5 of 2 per epoch), holds it too
    assert torch.equal(seen[3], seen[4]) and torch.equal(seen[4], bias) and not bias.requires_grad
    assert torch.equal(run.flat_params, run.weight_average.slow)   # the run ends on the average


def test_tta_levels_script_evaluates_the_newest_checkpoint_at_each_level(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    from meta_llr.run import train

    spec = importlib.util.spec_from_file_location("tta_levels", Path(__file__).parent.parent / "scripts" / "tta_levels.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    cfg = compose(["controller=uniform", "model=fastnet", "model.widths=[8]", "data=synthetic", "data.train_size=64",
                   "data.test_size=32", "trainer.epochs=1", "trainer.batch_size=32", "quiet=true", "trainer.tta=1"])
    train(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    capsys.readouterr()
    assert script.main([str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("step 2") and [line.split(":")[0].strip() for line in lines[1:]] == \
        ["trainer.tta=0", "trainer.tta=1", "trainer.tta=2"]
    level1 = lines[2].split("test acc ")[1].split(",")
    assert float(level1[0]) == pytest.approx(summary["final_test_acc"], abs=1e-4)
    assert float(level1[1].split("test loss ")[1].split()[0]) == pytest.approx(summary["final_test_loss"], abs=1e-4)
    assert script.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path} holds no config.yaml; give the directory of a run"
