"""Layer tracing orders layers by execution and groups them contiguously."""
import pytest
import torch
from torch import nn

from meta_llr.errors import UserError
from meta_llr.layers import group_layers, layer_table, trace_layers
from meta_llr.models import build_model


class ShortcutLast(nn.Module):
    """The shortcut conv is *registered* first but *runs* after the residual branch."""

    def __init__(self):
        super().__init__()
        self.shortcut = nn.Conv2d(3, 8, 1, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        out = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        out = out + self.shortcut_bn(self.shortcut(x))
        return self.head(out.mean((2, 3)))


def test_execution_order_beats_registration_order():
    model = ShortcutLast()
    traced = trace_layers(model, torch.randn(2, 3, 8, 8))
    assert [t.name for t in traced] == ["conv1", "conv2", "shortcut", "head"]
    assert traced[0].modules == ["conv1", "bn1"]
    assert traced[2].modules == ["shortcut", "shortcut_bn"]
    # every trainable parameter is in exactly one layer
    ids = [id(p) for t in traced for p in t.params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_resnet20_shortcut_convs_sit_at_their_depth():
    model = build_model("resnet", 3, 32, 10, depth=20, shortcut="conv")
    traced = trace_layers(model, torch.randn(2, 3, 32, 32))
    names = [t.name for t in traced]
    assert len(names) == 19 + 2 + 1  # 19 convs + 2 projection shortcuts + head
    shortcuts = [i for i, n in enumerate(names) if "shortcut" in n or "downsample" in n or "proj" in n]
    assert len(shortcuts) == 2
    for i in shortcuts:  # each projection runs right after its block's second conv
        block = names[i].rsplit(".", 2)[0]
        assert names[i - 1].startswith(block) and names[i - 2].startswith(block)
    assert names[-1] != names[0]
    ids = [id(p) for t in traced for p in t.params]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("count,groups,sizes", [(10, 3, [4, 3, 3]), (22, 3, [8, 7, 7]), (5, 5, [1] * 5), (5, 1, [5])])
def test_groups_are_contiguous_and_balanced(count, groups, sizes):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(count)])
    traced = trace_layers(model, torch.randn(2, 4))
    units, group_of = group_layers(traced, groups)
    assert [len(u.modules) for u in units] == sizes
    assert group_of == sorted(group_of)  # contiguous, in depth order
    assert [u.depth for u in units] == ([g / (groups - 1) for g in range(groups)] if groups > 1 else [0.0])
    rows = layer_table(traced, group_of)
    assert [r["group"] for r in rows] == group_of and rows[0]["params"] == 20


def test_no_grouping_and_bad_group_count():
    traced = trace_layers(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), torch.randn(2, 4))
    units, _ = group_layers(traced, 0)
    assert [u.name for u in units] == ["0", "1"] and [u.depth for u in units] == [0.0, 1.0]
    with pytest.raises(UserError, match="layers.groups=3 but the model has 2 layers"):
        group_layers(traced, 3)
