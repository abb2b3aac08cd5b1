"""The restructurings of round 2 leave the computation alone: records and final weights of four
controllers on digits equal those recorded with the code before them (tests/fixtures/)."""
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_config
from tests.fixtures.record_reference import CASES, COMMON, records_of

REFERENCE = Path(__file__).parent / "fixtures" / "reference"


@pytest.mark.parametrize("name", sorted(CASES))
def test_records_equal_the_reference(name, tmp_path):
    from meta_llr.run import build_run

    run = build_run(compose_config(*COMMON, *CASES[name]), tmp_path)
    run.fit()
    expected = json.loads((REFERENCE / f"{name}.json").read_text())
    got = records_of(tmp_path)
    assert got["llr_csv"] == expected["llr_csv"]
    assert got["metrics"] == expected["metrics"]
    weights = torch.load(REFERENCE / f"{name}.weights.pt")
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
