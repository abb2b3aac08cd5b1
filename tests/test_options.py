"""Every option of the config, out of range and wrongly typed, ends in one UserError line that
names it: the sections of meta_llr/config.py, every model, data source and schedule (their
ranges read from the dataclasses), and every controller's options (ranges checked by the
controller, values in meta_llr/faults.py's CONTROLLER_BAD, the catalogue the fault suite shares)."""
import copy
import dataclasses
import functools
import math
import typing

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from meta_llr.config import compose, validate
from meta_llr.errors import UserError
from meta_llr.faults import CONTROLLER_BAD, controller_cases, option_cases, out_of_range, wrong_type
from meta_llr.registry import available

available()

UNBOUNDED: set = set()  # controller options that take any value of their type (none so far)


SECTION_CASES = list(option_cases())


def check_one_line(overrides, key):
    with pytest.raises(UserError) as info:
        compose(overrides)
    message = str(info.value)
    assert "\n" not in message and key in message, message


@functools.lru_cache(maxsize=None)
def valid_config(select: tuple[str, ...]):
    return compose(list(select))


def out_of_range_message(select, key, bad) -> str:
    """The UserError of ``compose([*select, f"{key}={bad}"])`` for a value of the right type:
    Hydra's merge accepts it and ``validate`` refuses it, so the cases share one composition
    of ``select`` and take ``validate`` alone (test_validate_alone_says_what_compose_says)."""
    with pytest.raises(UserError) as info:
        try:
            cfg = copy.deepcopy(valid_config(tuple(select)))
        except UserError:  # select alone is incomplete (replay without its curve): the whole path
            compose([*select, f"{key}={bad}"])
        OmegaConf.update(cfg, key, OverridesParser.create().parse_override(f"{key}={bad}").value(), merge=False)
        validate(cfg)
    return str(info.value)


def check_out_of_range(select, key, bad):
    message = out_of_range_message(select, key, bad)
    assert "\n" not in message and key in message, message


@pytest.mark.parametrize("select,key,cls,field,kind", SECTION_CASES, ids=[f"{s[:1]}{k}" for s, k, *_ in SECTION_CASES])
def test_every_option_out_of_range_and_wrongly_typed(select, key, cls, field, kind):
    bounds = dataclasses.fields(cls)[[f.name for f in dataclasses.fields(cls)].index(field)].metadata.get("range")
    assert bounds is not None, f"{key} has no declared range: declare one with opt(..., free=True if none applies)"
    bad = out_of_range(bounds)
    if bad is None:  # free: a flag, a path or free text — only its type can be wrong
        assert bounds.free and (kind is bool or "str" in repr(kind)), f"{key}: only flags and text may be free"
    else:
        check_out_of_range(select, key, bad)
    wrong = wrong_type(kind)
    if wrong is not None and not (bounds.free and str in (kind, *typing.get_args(kind))):
        check_one_line([*select, f"{key}={wrong}"], key)


CONTROLLER_CASES = controller_cases()


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
        message = out_of_range_message(select, f"controller.{option}", bad)
        assert "\n" not in message and option in message, message
    wrong = wrong_type(kind)
    if wrong is not None and typing.Optional[str] != kind:
        check_one_line([*select, f"controller.{option}={wrong}"], f"controller.{option}")
    if float in (kind, *typing.get_args(kind)):
        for value in ("nan", "inf", "-inf"):
            bad = f"[{value}]" if typing.get_origin(kind) is list else value
            message = out_of_range_message(select, f"controller.{option}", bad)
            assert "\n" not in message and f"controller.{option}=" in message and "finite" in message, message


def test_the_table_names_only_real_options():
    real = {(n, o) for n, o, _ in CONTROLLER_CASES}
    assert set(CONTROLLER_BAD) <= real, sorted(set(CONTROLLER_BAD) - real)
    assert len(SECTION_CASES) > 60 and math.isfinite(len(CONTROLLER_CASES))


@pytest.mark.parametrize("select,key,bad", [
    ([], "trainer.epochs", "0"),
    (["schedule=step"], "schedule.milestones", "[1.5]"),
    (["controller=rnn_meta"], "controller.hidden", "0"),
])
def test_validate_alone_says_what_compose_says(select, key, bad):
    with pytest.raises(UserError) as info:
        compose([*select, f"{key}={bad}"])
    assert out_of_range_message(select, key, bad) == str(info.value)
