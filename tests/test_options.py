"""Every option of the config, out of range and wrongly typed, ends in one UserError line that
names it: the sections of meta_llr/config.py, every model, data source and schedule (their
ranges read from the dataclasses), and every controller's options (ranges checked by the
controller, values below)."""
import dataclasses
import math
import typing

import pytest

from meta_llr.config import Config, compose
from meta_llr.data import SOURCES
from meta_llr.errors import UserError
from meta_llr.models import MODEL_CONFIGS
from meta_llr.options import Range
from meta_llr.registry import CONTROLLER_CONFIGS, available
from meta_llr.schedules import SCHEDULES

available()

# Controller options checked by the controller's __init__: an out-of-range value for each.
# Options absent here must be flags, choices of a file path, or listed in UNBOUNDED.
CONTROLLER_BAD = {
    ("cascade_onecycle", "peak_at"): "[1.5]", ("cascade_onecycle", "peak"): "[-1.0]",
    ("cascade_onecycle", "start"): "-1", ("cascade_onecycle", "end"): "-1", ("cascade_onecycle", "anneal"): "zzz",
    ("depth_cyclic", "low"): "-1", ("depth_cyclic", "high"): "0.1", ("depth_cyclic", "max_cycles"): "0",
    ("depth_cyclic", "min_cycles"): "0",
    ("depth_linear", "first"): "-1", ("depth_linear", "last"): "-1",
    ("discriminative", "factor"): "0",
    ("fixed_linear", "start"): "[-1.0]", ("fixed_linear", "end"): "[-1.0]", ("fixed_linear", "t0"): "[1.5]",
    ("fixed_linear", "t1"): "[-0.5]",
    ("freezeout", "t0"): "0", ("freezeout", "spacing"): "zzz",
    ("llrd", "decay"): "0",
    ("replay", "curve"): "/nonexistent/curve.json", ("replay", "match"): "zzz",
    ("soft_freeze", "high"): "0.01", ("soft_freeze", "low"): "-1", ("soft_freeze", "half_life"): "[0.0]",
    ("unfreeze", "every"): "0", ("unfreeze", "direction"): "zzz",
    ("adam_probe", "beta1"): "1", ("adam_probe", "beta2"): "1", ("adam_probe", "eps"): "0", ("adam_probe", "ema"): "0",
    ("adam_probe", "probe_every"): "-1", ("adam_probe", "quantiles"): "[1.5]", ("adam_probe", "min_scale"): "0",
    ("adam_probe", "max_scale"): "0.001",
    ("hessian_secant", "interval"): "0", ("hessian_secant", "ema"): "0", ("hessian_secant", "form"): "zzz",
    ("hessian_secant", "gain"): "0", ("hessian_secant", "min_scale"): "0", ("hessian_secant", "max_scale"): "0.001",
    ("hypergrad", "rule"): "zzz", ("hypergrad", "beta"): "-1", ("hypergrad", "min_scale"): "0",
    ("hypergrad", "max_scale"): "0.001",
    ("lars", "trust"): "0", ("lars", "wd"): "-1", ("lars", "min_scale"): "0", ("lars", "max_scale"): "0.00001",
    ("layca", "alpha"): "1", ("layca", "other_params"): "zzz", ("layca", "min_scale"): "0",
    ("layca", "max_scale"): "0.0001",
    ("rnn_meta", "learn"): "zzz", ("rnn_meta", "weights"): "/nonexistent/weights.pt", ("rnn_meta", "hidden"): "0",
    ("rnn_meta", "min_scale"): "0", ("rnn_meta", "max_scale"): "0.01", ("rnn_meta", "every"): "0",
    ("rnn_meta", "horizon"): "0", ("rnn_meta", "meta_lr"): "-1", ("rnn_meta", "unroll"): "0",
    ("rnn_meta", "meta_every"): "0", ("rnn_meta", "feature_decay"): "1", ("rnn_meta", "baseline"): "[-1.0]",
    ("width_scaled", "base_fan_in"): "0", ("width_scaled", "column"): "zzz",
    ("hessian_secant", "power"): "-1", ("hessian_secant", "blocks"): "zzz", ("hessian_secant", "min_update_ratio"): "1",
    ("lamb", "min_scale"): "0", ("lamb", "max_scale"): "0.0001",
    ("prodigy_layer", "mode"): "zzz", ("prodigy_layer", "d0"): "0", ("prodigy_layer", "gamma"): "0",
    ("prodigy_layer", "beta3"): "1.5", ("prodigy_layer", "beta2"): "1", ("prodigy_layer", "min_scale"): "0",
    ("prodigy_layer", "max_scale"): "0.01",
    ("rnn_meta", "seed"): "-1", ("rnn_meta", "baseline_curve"): "/nonexistent/curve.json",
}
UNBOUNDED: set = set()  # controller options that take any value of their type (none so far)


def _origin(kind):
    return typing.get_origin(kind) or kind


def wrong_type(kind) -> str | None:
    """A value OmegaConf must refuse for a field of this type."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    base = _origin(args[0] if typing.get_origin(kind) is typing.Union and args else kind)
    if base in (int, float, bool):
        return "abc"
    if base is list:
        return "abc"
    if base is str:
        return "[1,2]"
    return None


def out_of_range(bounds: Range) -> str | None:
    if bounds is None or bounds.free:
        return None
    if bounds.choices is not None:
        value = "zzz" if all(isinstance(c, str) for c in bounds.choices) else "7"
    elif bounds.ge is not None:
        value = f"{bounds.ge - 1:g}"
    elif bounds.gt is not None:
        value = f"{bounds.gt:g}"
    elif bounds.le is not None:
        value = f"{bounds.le + 1:g}"
    elif bounds.lt is not None:
        value = f"{bounds.lt:g}"
    else:
        value = "inf" if bounds.finite else None
    if bounds.length is not None and value is not None:
        return f"[{value}]" if bounds.length[0] <= 1 else "[" + ",".join([value] * bounds.length[0]) + "]"
    return value


def section_cases():
    """(selection overrides, key, dataclass field) for every declared option."""
    def walk(cls, prefix, select):
        for f in dataclasses.fields(cls):
            if f.name == "name" or f.type is typing.Any or f.type == "Any":
                continue
            kind = typing.get_type_hints(cls)[f.name]
            key = f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(kind):
                yield from walk(kind, key, select)
            else:
                yield select, key, cls, f.name, kind

    yield from walk(Config, "", [])
    for group, configs in (("model", MODEL_CONFIGS), ("data", SOURCES), ("schedule", SCHEDULES)):
        for name, cls in configs.items():
            yield from walk(cls, group, [f"{group}={name}"])


SECTION_CASES = list(section_cases())


def check_one_line(overrides, key):
    with pytest.raises(UserError) as info:
        compose(overrides)
    message = str(info.value)
    assert "\n" not in message and key in message, message


@pytest.mark.parametrize("select,key,cls,field,kind", SECTION_CASES, ids=[f"{s[:1]}{k}" for s, k, *_ in SECTION_CASES])
def test_every_option_out_of_range_and_wrongly_typed(select, key, cls, field, kind):
    bounds = dataclasses.fields(cls)[[f.name for f in dataclasses.fields(cls)].index(field)].metadata.get("range")
    assert bounds is not None, f"{key} has no declared range: declare one with opt(..., free=True if none applies)"
    bad = out_of_range(bounds)
    if bad is None:  # free: a flag, a path or free text — only its type can be wrong
        assert bounds.free and (kind is bool or "str" in repr(kind)), f"{key}: only flags and text may be free"
    else:
        check_one_line([*select, f"{key}={bad}"], key)
    wrong = wrong_type(kind)
    if wrong is not None and not (bounds.free and str in (kind, *typing.get_args(kind))):
        check_one_line([*select, f"{key}={wrong}"], key)


CONTROLLER_CASES = [(name, f.name, f.type) for name, cls in CONTROLLER_CONFIGS.items() if name in available()
                    for f in dataclasses.fields(cls) if f.name != "name"]


@pytest.mark.parametrize("name,option,kind", CONTROLLER_CASES, ids=[f"{n}.{o}" for n, o, _ in CONTROLLER_CASES])
def test_every_controller_option_out_of_range_and_wrongly_typed(name, option, kind, tmp_path):
    select = [f"controller={name}"]
    if name == "replay" and option != "curve":
        cls = available()[name]
        select += [f"controller.{k}={v}" for k, v in cls.example_options(tmp_path).items()]
    bad = CONTROLLER_BAD.get((name, option))
    if bad is None:
        assert kind is bool or (name, option) in UNBOUNDED, f"controller {name}: give {option} an out-of-range case"
    else:
        with pytest.raises(UserError) as info:
            compose([*select, f"controller.{option}={bad}"])
        message = str(info.value)
        assert "\n" not in message and option in message, message
    wrong = wrong_type(kind)
    if wrong is not None and typing.Optional[str] != kind:
        check_one_line([*select, f"controller.{option}={wrong}"], f"controller.{option}")


def test_the_table_names_only_real_options():
    real = {(n, o) for n, o, _ in CONTROLLER_CASES}
    assert set(CONTROLLER_BAD) <= real, sorted(set(CONTROLLER_BAD) - real)
    assert len(SECTION_CASES) > 60 and math.isfinite(len(CONTROLLER_CASES))
