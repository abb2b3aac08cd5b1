"""The documentation stays true: the Python blocks of docs/writing-a-controller.md run as
written, docs/controllers.md has a section for every registered controller with every one of
its options (name, type and default as in its ``__init__``) and its ``requires``, and the
relative links of README.md and docs/*.md resolve.

``python tests/test_docs.py NAME...`` prints the options tables of docs/controllers.md
(all controllers without arguments): regenerate a table there when a signature changes.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_CONTROLLER = "grad_share_doc"  # the name docs/writing-a-controller.md registers


def python_blocks(path: Path) -> list[str]:
    """The ```python fenced blocks of a Markdown file, in order."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@pytest.fixture
def forget_doc_controller():
    """Registering a controller is process-wide: remove the page's one afterwards, so no later
    test (e.g. one that loops over every registered controller) meets it."""
    from hydra.core.config_store import ConfigStore

    from meta_llr.registry import CONTROLLER_CONFIGS, CONTROLLERS, available

    assert DOC_CONTROLLER not in available(), f"{DOC_CONTROLLER} is already registered"
    yield
    CONTROLLERS.pop(DOC_CONTROLLER, None)
    CONTROLLER_CONFIGS.pop(DOC_CONTROLLER, None)
    ConfigStore.instance().repo.get("controller", {}).pop(f"{DOC_CONTROLLER}.yaml", None)


def test_writing_a_controller_runs(tmp_path, monkeypatch, forget_doc_controller):
    blocks = python_blocks(DOCS / "writing-a-controller.md")
    assert len(blocks) >= 4
    monkeypatch.setenv("META_LLR_DOC_DIR", str(tmp_path))
    namespace = {"__name__": "writing_a_controller"}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"docs/writing-a-controller.md, python block {number}", "exec"), namespace)
    assert (tmp_path / "grad_share" / "summary.json").is_file()


# ----------------------------------------------------------------------------- controllers.md
def show_value(value) -> str:
    """A default as it is written on the command line (``controller.KEY=...``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def show_type(kind) -> str:
    if typing.get_origin(kind) is typing.Union:
        rest = [a for a in typing.get_args(kind) if a is not type(None)]
        return " or ".join(show_type(a) for a in rest) + " or null"
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind) or (typing.Any,)
        return f"list[{show_type(item)}]"
    return getattr(kind, "__name__", str(kind).replace("typing.", ""))


def option_rows(name: str) -> list[tuple[str, str, str]]:
    """(option, type, default) of every option of controller ``name``, from its config dataclass
    (the one derived from ``__init__``)."""
    from meta_llr.registry import CONTROLLER_CONFIGS, available

    available()
    rows = []
    for field in dataclasses.fields(CONTROLLER_CONFIGS[name]):
        if field.name == "name":
            continue
        default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
        rows.append((field.name, show_type(field.type), show_value(default)))
    return rows


def options_table(name: str) -> str:
    rows = option_rows(name)
    if not rows:
        return "No options."
    lines = ["| option | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{option}` | {kind} | `{default}` | |" for option, kind, default in rows]
    return "\n".join(lines)


def sections(path: Path) -> dict[str, str]:
    """``## name`` sections of a Markdown file: name -> text up to the next ``## ``."""
    parts = re.split(r"^## +`?([A-Za-z0-9_]+)`?[^\n]*\n", path.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_controller_and_option_is_documented():
    from meta_llr.registry import available

    found = sections(DOCS / "controllers.md")
    problems = []
    for name in available():
        if name not in found:
            problems.append(f"no section '## {name}'")
            continue
        table = {m.group(1): (m.group(2).strip(), m.group(3)) for m in re.finditer(
            r"^\| `([A-Za-z0-9_]+)` \|([^|]*)\| `([^`]*)` \|", found[name], flags=re.M)}
        for option, kind, default in option_rows(name):
            if option not in table:
                problems.append(f"{name}: option '{option}' missing from its options table")
            elif table[option] != (kind, default):
                problems.append(f"{name}.{option}: the table says {table[option]}, __init__ says {(kind, default)}")
        for override in available()[name].requires:  # e.g. lamb: trainer.optimizer=adamw
            if f"`{override}`" not in found[name]:
                problems.append(f"{name}: its requirement `{override}` is not in its section")
    assert not problems, "docs/controllers.md is out of date (python tests/test_docs.py prints the tables):\n" \
        + "\n".join(problems)


def test_layout_lists_every_module():
    """docs/concepts.md's layout names every module of the packages and of tests/."""
    text = (DOCS / "concepts.md").read_text()
    missing = [str(path.relative_to(ROOT))
               for folder in ("meta_llr", "meta_llr/data", "baselines", "controllers", "tests")
               for path in sorted((ROOT / folder).glob("*.py")) if f"`{path.name}`" not in text]
    assert not missing, "docs/concepts.md's layout does not list: " + ", ".join(missing)


def test_relative_links_resolve():
    missing = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, "broken links:\n" + "\n".join(missing)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from meta_llr.registry import available

    for controller in sys.argv[1:] or list(available()):
        print(f"## {controller}\n\n{options_table(controller)}\n")
