"""A default that does not train is a bug: every registered controller, with its defaults (and
the overrides it requires), reaches 0.90 test accuracy on digits in a short run of a small model.
Functional, not timed; the whole check takes a few seconds per controller."""
import pytest

import meta_llr
from meta_llr.registry import available

SHORT = ["data=digits", "model=mlp", "model.hidden=64", "trainer.epochs=8", "trainer.batch_size=64",
         "device=cpu", "quiet=true", "trainer.checkpoint=false"]


@pytest.mark.parametrize("name", sorted(available()))
def test_defaults_train_on_digits(name, tmp_path, one_thread):
    cls = available()[name]
    example = cls.example_options(tmp_path)
    overrides = [*SHORT, *cls.requires, f"controller={name}", *(f"controller.{k}={v}" for k, v in example.items())]
    summary = meta_llr.fit(overrides=overrides, out_dir=tmp_path / "run").summary
    assert summary["status"] == "finished", summary.get("reason") or summary.get("error")
    assert summary["final_test_acc"] >= 0.90, f"{name}: {summary['final_test_acc']:.3f} with its defaults"
