"""Datasets and augmentation: known answers on tiny data built here (no network, no user cache)."""
import io
import os
import pickle
import tarfile
import zipfile
from importlib.resources import files

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import meta_llr.data as data_mod
import meta_llr.data.cifar as cifar_mod
import meta_llr.data.imagefolder as imagefolder_mod
from meta_llr.data import (SOURCES, AugmentConfig, DataConfig, Dataset, DigitsConfig, ImageFolderConfig, Split,
                           SyntheticConfig, augment, load_data, read_cifar, stratified_holdout)
from meta_llr.errors import UserError
from meta_llr.options import check_section


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the real user cache, never download."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(cifar_mod, "_download_archive", no_network)


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, f"UserError must be one line: {msg!r}"
    return msg


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_data({"name": "digits"})


def test_digits_shapes_dtypes_and_classes(digits):
    d = digits
    assert isinstance(d, Dataset) and d.name == "digits" and not d.synthetic
    assert d.train.x.shape == (1437, 1, 8, 8) and d.test.x.shape == (360, 1, 8, 8)
    assert d.train.x.dtype == torch.uint8 and d.train.y.dtype == torch.int64
    assert d.train.x.is_contiguous() and d.test.x.is_contiguous() and d.train.x.device.type == "cpu"
    assert d.val is None
    assert d.classes == [str(i) for i in range(10)] and d.num_classes == 10
    assert d.in_channels == 1 and d.image_size == 8
    # Stratified: every class has 35..37 of the 360 test images.
    counts = torch.bincount(d.test.y, minlength=10)
    assert counts.sum() == 360 and counts.min() >= 35 and counts.max() <= 37


def test_digits_pixel_scaling_and_stats(digits):
    from sklearn.datasets import load_digits

    raw = load_digits().images  # 0..16
    allowed = set(np.rint(np.arange(17) * 255 / 16).astype(int).tolist())
    x = torch.cat([digits.train.x, digits.test.x])
    assert set(torch.unique(x).tolist()) <= allowed and int(x.max()) == 255 and int(x.min()) == 0
    # The multiset of images is the whole dataset, scaled.
    assert int(x.to(torch.int64).sum()) == int(np.rint(raw * 255 / 16).astype(np.int64).sum())
    xf = digits.train.x.double() / 255
    assert digits.mean[0] == pytest.approx(float(xf.mean()), abs=1e-12)
    assert digits.std[0] == pytest.approx(float(xf.std(unbiased=False)), abs=1e-12)


def test_digits_split_is_deterministic_and_seeded(digits):
    again = load_data({"name": "digits", "split_seed": 0})
    assert torch.equal(again.train.x, digits.train.x) and torch.equal(again.test.y, digits.test.y)
    other = load_data({"name": "digits", "split_seed": 1})
    assert not torch.equal(other.test.x, digits.test.x)
    small = load_data({"name": "digits", "test_size": 100})
    assert len(small.test) == 100 and len(small.train) == 1697


def test_val_holdout_sizes_and_disjointness(digits):
    d = load_data({"name": "digits", "val_size": 200})
    assert len(d.val) == 200 and len(d.train) == 1237 and len(d.test) == 360
    assert torch.equal(d.test.x, digits.test.x)  # val comes out of train only
    # train + val is exactly the old train set (as a multiset of image+label rows).
    def rows(s):
        return sorted(map(tuple, torch.cat([s.x.flatten(1), s.y[:, None].to(torch.uint8)], 1).tolist()))

    assert rows(Split(torch.cat([d.train.x, d.val.x]), torch.cat([d.train.y, d.val.y]))) == rows(digits.train)
    assert torch.bincount(d.val.y, minlength=10).min() >= 19  # stratified
    # mean/std come from the remaining train images only.
    assert d.mean[0] == pytest.approx(float((d.train.x.double() / 255).mean()), abs=1e-12)
    assert d.mean != digits.mean
    d2 = load_data({"name": "digits", "val_size": 200})
    assert torch.equal(d2.val.x, d.val.x)


@pytest.mark.parametrize("bad", [-1, 1437, 5000])
def test_val_size_out_of_range(bad):
    with pytest.raises(UserError) as e:
        load_data({"name": "digits", "val_size": bad})
    assert "data.val_size" in one_line_error(e)


def test_stratified_holdout_known_answer():
    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    keep, hold = stratified_holdout(y, 5, seed=0)
    assert len(hold) == 5 and len(keep) == 5
    assert torch.bincount(y[hold], minlength=3).tolist() == [3, 2, 0]  # 3.0, 1.5, 0.5 -> ties to lower label
    assert sorted(torch.cat([keep, hold]).tolist()) == list(range(10))


def test_unknown_dataset():
    with pytest.raises(UserError) as e:
        load_data({"name": "mnist"})
    assert "digits" in one_line_error(e)


# --------------------------------------------------------------------------- synthetic


def test_synthetic():
    cfg = {"name": "synthetic", "channels": 1, "size": 8, "classes": 4, "train_size": 64, "test_size": 32}
    d = load_data(cfg)
    assert d.synthetic and d.source == "synthetic (random pixels)" and d.name == "synthetic"
    assert d.train.x.shape == (64, 1, 8, 8) and d.test.x.shape == (32, 1, 8, 8) and d.num_classes == 4
    assert d.train.x.dtype == torch.uint8 and d.train.y.dtype == torch.int64 and int(d.train.y.max()) < 4
    again = load_data(cfg)
    assert torch.equal(again.train.x, d.train.x) and torch.equal(again.test.y, d.test.y)
    assert not torch.equal(load_data({**cfg, "seed": 1}).train.x, d.train.x)


# --------------------------------------------------------------------------- configs


def test_sources_name_themselves_and_share_the_common_options():
    assert tuple(SOURCES) == data_mod.DATASET_NAMES
    for name, cls in SOURCES.items():
        cfg = cls()
        assert issubclass(cls, DataConfig) and cfg.name == name and cls.section == "data"
        assert isinstance(cfg.augment, AugmentConfig) and AugmentConfig.section == "data.augment"
        assert cfg.val_size == 0 and cfg.split_seed == 0
        expected_augment = {"digits": (0, False), "imagefolder": (4, False)}.get(name, (4, True))
        assert (cfg.augment.crop_pad, cfg.augment.flip) == expected_augment
        assert cls().augment is not cfg.augment  # one AugmentConfig per instance


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_defaults_pass_check_section(name):
    cls = SOURCES[name]
    check_section(cls())
    check_section(OmegaConf.structured(cls))  # the typed node Hydra's ConfigStore would hold


# The options and defaults of meta_llr/conf/data/<name>.yaml before the configs became dataclasses.
FORMER_YAML = {
    "digits": {"name": "digits", "test_size": 360, "split_seed": 0, "train_subset": 0, "val_size": 0, "augment": {"crop_pad": 0, "flip": False}},
    "cifar10": {"name": "cifar10", "root": None, "download": True, "val_size": 0, "split_seed": 0, "train_subset": 0,
                "augment": {"crop_pad": 4, "flip": True}},
    "cifar100": {"name": "cifar100", "root": None, "download": True, "fine_labels": True, "val_size": 0, "split_seed": 0, "train_subset": 0,
                 "augment": {"crop_pad": 4, "flip": True}},
    # imagefolder no longer flips by default: a generic image is not assumed mirror-symmetric
    "imagefolder": {"name": "imagefolder", "path": None, "channels": 3, "cache": True, "root": None, "workers": 2,
                    "val_size": 0, "split_seed": 0, "train_subset": 0, "augment": {"crop_pad": 4, "flip": False}},
    "synthetic": {"name": "synthetic", "channels": 3, "size": 32, "classes": 10, "train_size": 2048, "test_size": 512,
                  "seed": 0, "val_size": 0, "split_seed": 0, "train_subset": 0, "augment": {"crop_pad": 4, "flip": True}},
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_defaults_equal_the_former_yaml(name):
    added = {"alternate_flip": False, "pad_mode": "zeros"}   # augmentation options added since, off by default
    expected = {**FORMER_YAML[name], "augment": {**FORMER_YAML[name]["augment"], **added}}
    assert OmegaConf.to_container(OmegaConf.structured(SOURCES[name])) == expected


BAD_VALUES = [
    ("digits", {"val_size": -1}, "data.val_size=-1"),
    ("digits", {"augment": {"crop_pad": -1}}, "data.augment.crop_pad=-1"),
    ("digits", {"test_size": 0}, "data.test_size=0"),
    ("digits", {"test_size": 1797}, "data.test_size=1797"),
    ("digits", {"split_seed": -1}, "data.split_seed=-1"),
    ("digits", {"val_size": 1437}, "data.val_size=1437"),  # validate(): train images left by test_size
    ("cifar10", {"val_size": 50000}, "data.val_size=50000"),
    ("cifar100", {"augment": {"crop_pad": -4}}, "data.augment.crop_pad=-4"),
    ("imagefolder", {"channels": 2}, "data.channels=2"),
    ("imagefolder", {"workers": -1}, "data.workers=-1"),
    ("synthetic", {"classes": 1}, "data.classes=1"),
    ("synthetic", {"size": 0}, "data.size=0"),
    ("synthetic", {"train_size": 16, "val_size": 16}, "data.val_size=16"),
]


@pytest.mark.parametrize("name, bad, key", BAD_VALUES, ids=[k for _, _, k in BAD_VALUES])
def test_out_of_range_values_name_the_key(name, bad, key):
    cls = SOURCES[name]
    kwargs = {k: AugmentConfig(**v) if k == "augment" else v for k, v in bad.items()}
    with pytest.raises(UserError) as e:
        check_section(cls(**kwargs))
    assert one_line_error(e).startswith(f"{key} is out of range; allowed: ")
    # load_data checks before it reads anything (imagefolder has no path here).
    with pytest.raises(UserError) as e:
        load_data({"name": name, **bad})
    assert one_line_error(e).startswith(f"{key} is out of range")


def test_wrong_type_or_unknown_option_is_a_one_line_error():
    with pytest.raises(UserError) as e:
        load_data({"name": "digits", "val_size": "abc"})
    assert one_line_error(e).startswith("data.val_size: ")
    with pytest.raises(UserError) as e:
        load_data({"name": "digits", "valsize": 3})
    msg = one_line_error(e)
    assert msg.startswith("data.valsize: ") and "test_size" in msg
    with pytest.raises(UserError) as e:
        load_data({"name": "digits", "augment": {"flop": True}})
    msg = one_line_error(e)
    assert msg.startswith("data.augment.flop: ") and "crop_pad, flip" in msg
    assert len(load_data({"name": "digits", "val_size": "5"}).val) == 5  # as the CLI passes it


def test_load_data_accepts_a_dictconfig_and_a_dataclass():
    small = {"train_size": 16, "test_size": 8, "size": 4}
    untyped = OmegaConf.create({**OmegaConf.to_container(OmegaConf.structured(SyntheticConfig)), **small})
    typed = OmegaConf.merge(OmegaConf.structured(SyntheticConfig), small)
    instance = SyntheticConfig(**small)
    loaded = [load_data(cfg) for cfg in (untyped, typed, instance, {"name": "synthetic", **small})]
    assert loaded[0].train.x.shape == (16, 3, 4, 4)
    for d in loaded[1:]:
        assert torch.equal(d.train.x, loaded[0].train.x) and torch.equal(d.test.y, loaded[0].test.y)
    d = load_data(DigitsConfig(val_size=10))
    assert d.name == "digits" and len(d.val) == 10
    assert load_data(None).name == "digits"


# --------------------------------------------------------------------------- imagefolder

# class -> solid RGB colours of its images; 5 high x 4 wide so H/W mix-ups show.
COLOURS = {
    "red": [(255, 0, 0), (200, 10, 20), (150, 30, 40)],
    "blue": [(0, 0, 255), (10, 20, 200), (5, 6, 7)],
}
TEST_COLOURS = {"red": [(254, 1, 2)], "blue": [(3, 4, 250)]}
H, W = 5, 4


def png_bytes(colour, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (W, H), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_tree(root, splits=(("train", COLOURS), ("test", TEST_COLOURS))):
    for split, table in splits:
        for cls, colours in table.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i, c in enumerate(colours):
                (root / split / cls / f"{i:02d}.png").write_bytes(png_bytes(c))
    return root


def write_zip(zpath, splits, extra=(), compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(zpath, "w", compression=compression) as zf:
        for split, table in splits:
            for cls, colours in table.items():
                for i, c in enumerate(colours):
                    zf.writestr(f"{split}/{cls}/{i:02d}.png", png_bytes(c))
        for name, content in extra:
            zf.writestr(name, content)


def expected(table):
    classes = sorted(table)
    xs, ys = [], []
    for k, cls in enumerate(classes):
        for c in table[cls]:
            xs.append(torch.tensor(c, dtype=torch.uint8)[:, None, None].expand(3, H, W))
            ys.append(k)
    return torch.stack(xs), torch.tensor(ys)


def check_known(d):
    assert d.classes == ["blue", "red"] and d.num_classes == 2
    assert d.train.x.shape == (6, 3, H, W) and d.test.x.shape == (2, 3, H, W)
    assert d.train.x.dtype == torch.uint8 and d.train.x.is_contiguous()
    x, y = expected(COLOURS)
    assert torch.equal(d.train.x, x) and torch.equal(d.train.y, y)
    x, y = expected(TEST_COLOURS)
    assert torch.equal(d.test.x, x) and torch.equal(d.test.y, y)
    red = torch.tensor([255, 200, 150, 0, 10, 5], dtype=torch.float64) / 255
    assert d.mean[0] == pytest.approx(float(red.mean()), abs=1e-12)
    assert d.std[0] == pytest.approx(float(red.std(unbiased=False)), abs=1e-12)


def cache_files(root):
    return sorted((root / "imagefolder").glob("*.npz")) if (root / "imagefolder").exists() else []


def test_imagefolder_png_tree_and_cache(tmp_path, monkeypatch):
    data = write_tree(tmp_path / "imgs")
    (data / "train" / "red" / "notes.txt").write_text("not an image")
    cache = tmp_path / "cache"
    cfg = {"name": "imagefolder", "path": str(data), "root": str(cache)}
    d = load_data(cfg)
    check_known(d)
    assert d.source == str(data.absolute()) and not d.synthetic
    [npz] = cache_files(cache)

    def must_not_decode(*a, **k):
        raise AssertionError("second load must come from the cache")

    monkeypatch.setattr(imagefolder_mod, "_decode", must_not_decode)
    again = load_data(cfg)
    check_known(again)
    assert torch.equal(again.train.x, d.train.x) and again.classes == d.classes
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    # Changing a file changes the key: the tree is decoded again.
    img = data / "test" / "red" / "00.png"
    img.write_bytes(png_bytes((9, 9, 9)))
    os.utime(img, ns=(1, 1))
    d3 = load_data(cfg)
    assert d3.test.x[1, :, 0, 0].tolist() == [9, 9, 9]
    [npz3] = cache_files(cache)  # the stale cache was replaced
    assert npz3 != npz

    # cache: false writes nothing.
    nocache = tmp_path / "nocache"
    load_data({**cfg, "root": str(nocache), "cache": False})
    assert cache_files(nocache) == []


def test_imagefolder_default_cache_dir_is_xdg(tmp_path):
    data = write_tree(tmp_path / "imgs")
    load_data({"name": "imagefolder", "path": str(data)})
    assert len(cache_files(tmp_path / "xdg" / "meta_llr")) == 1


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_imagefolder_one_zip_for_both_splits(tmp_path, compression):
    data = tmp_path / "zipped"
    data.mkdir()
    write_zip(data / "all.zip", [("train", COLOURS), ("test", TEST_COLOURS)],
              extra=[("README.txt", "hi"), ("__MACOSX/train/red/._00.png", "junk")], compression=compression)
    check_known(load_data({"name": "imagefolder", "path": str(data), "cache": False}))
    # The zip file itself may be given as the path.
    check_known(load_data({"name": "imagefolder", "path": str(data / "all.zip"), "cache": False}))


def test_imagefolder_one_zip_per_split_with_pool(tmp_path, monkeypatch):
    data = tmp_path / "zipped"
    data.mkdir()
    write_zip(data / "b-test.zip", [("test", TEST_COLOURS)])
    write_zip(data / "a-train.zip", [("train", COLOURS)])
    monkeypatch.setattr(imagefolder_mod, "_POOL_MIN_ITEMS", 0)  # exercise the 2-process decoder
    check_known(load_data({"name": "imagefolder", "path": str(data), "workers": 2, "root": str(tmp_path / "c")}))


def test_imagefolder_grayscale(tmp_path):
    data = write_tree(tmp_path / "imgs")
    d = load_data({"name": "imagefolder", "path": str(data), "channels": 1, "cache": False})
    assert d.train.x.shape == (6, 1, H, W) and d.in_channels == 1
    r, g, b = COLOURS["blue"][0]
    assert int(d.train.x[0, 0, 0, 0]) == round((r * 299 + g * 587 + b * 114) / 1000)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(UserError) as e:
        load_data({"name": "imagefolder", "path": str(tmp_path / "nope")})
    assert one_line_error(e) == (
        f"data.path '{tmp_path / 'nope'}' does not exist; pass data.path=DIR holding train/ and test/ folders or zips"
    )
    for missing in (None, "???", " "):
        with pytest.raises(UserError) as e:
            load_data({"name": "imagefolder", "path": missing})
        assert "data=imagefolder needs data.path=DIR" in one_line_error(e)
    with pytest.raises(UserError) as e:
        check_section(ImageFolderConfig(path=str(tmp_path), channels=2))
    assert one_line_error(e) == "data.channels=2 is out of range; allowed: one of 1, 3"

    # val_size against the train images: counted from the file listing, before anything is decoded.
    six = write_tree(tmp_path / "six")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imagefolder_mod, "_decode", lambda *a: pytest.fail("val_size must be checked before decoding"))
        with pytest.raises(UserError) as e:
            load_data({"name": "imagefolder", "path": str(six), "val_size": 6, "cache": False})
    assert one_line_error(e) == (f"data.val_size=6 is out of range; allowed: < 6, the 6 train images under data.path "
                                 f"'{six.absolute()}' (0: no validation split)")

    only_train = write_tree(tmp_path / "only_train", splits=(("train", COLOURS),))
    (only_train / "valid").mkdir()
    with pytest.raises(UserError) as e:
        load_data({"name": "imagefolder", "path": str(only_train)})
    msg = one_line_error(e)
    assert "no test" in msg and "train/" in msg and "valid/" in msg

    mismatch = write_tree(tmp_path / "mismatch", splits=(("train", COLOURS), ("test", {"red": [(1, 2, 3)]})))
    with pytest.raises(UserError) as e:
        load_data({"name": "imagefolder", "path": str(mismatch)})
    assert "classes differ" in one_line_error(e)

    sizes = write_tree(tmp_path / "sizes")
    Image.new("RGB", (7, 7), (1, 1, 1)).save(sizes / "test" / "red" / "99.png")
    with pytest.raises(UserError) as e:
        load_data({"name": "imagefolder", "path": str(sizes)})
    assert "99.png" in one_line_error(e)


def damage_member(zpath, member):
    """Flip bytes inside ``member``'s (compressed or stored) data in the zip ``zpath``."""
    with zipfile.ZipFile(zpath) as zf:
        info = zf.getinfo(member)
    raw = bytearray(zpath.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for k in range(start + 2, start + min(info.compress_size, 12)):
        raw[k] ^= 0xFF
    zpath.write_bytes(bytes(raw))


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("member", ["train/blue/00.png", "test/red/00.png"])  # the first image, a later one
def test_imagefolder_damaged_zip_member_is_one_line(tmp_path, compression, member):
    data = tmp_path / "zipped"
    data.mkdir()
    write_zip(data / "all.zip", [("train", COLOURS), ("test", TEST_COLOURS)], compression=compression)
    damage_member(data / "all.zip", member)
    with pytest.raises(UserError) as e:
        load_data({"name": "imagefolder", "path": str(data), "cache": False})
    msg = one_line_error(e)
    assert str(data / "all.zip") in msg and member in msg and "download or extract it again" in msg


def test_imagefolder_bad_files_are_one_line(tmp_path):
    def error(path, **options):
        with pytest.raises(UserError) as e:
            load_data({"name": "imagefolder", "path": str(path), "cache": False, **options})
        return one_line_error(e)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    write_zip(truncated / "all.zip", [("train", COLOURS), ("test", TEST_COLOURS)])
    (truncated / "all.zip").write_bytes((truncated / "all.zip").read_bytes()[:100])
    msg = error(truncated)
    assert str(truncated / "all.zip") in msg and "damaged" in msg and "download or extract it again" in msg

    not_zip = tmp_path / "weights.pt"
    not_zip.write_bytes(b"\x80\x02 not a zip")
    msg = error(not_zip)
    assert str(not_zip) in msg and "not a readable zip" in msg and "pass a folder" in msg

    no_images = tmp_path / "no_images"
    no_images.mkdir()
    write_zip(no_images / "notes.zip", [], extra=[("train/red/readme.txt", "hi")])
    assert "no train or test images" in error(no_images) and "notes.zip" in error(no_images)
    assert "zip notes.zip with no train/<class>/<image>" in error(no_images / "notes.zip")

    (tmp_path / "empty").mkdir()
    assert str(tmp_path / "empty") in error(tmp_path / "empty") and "an empty folder" in error(tmp_path / "empty")
    text_only = tmp_path / "text_only"
    for split in ("train", "test"):
        (text_only / split / "red").mkdir(parents=True)
        (text_only / split / "red" / "notes.txt").write_text("not an image")
    assert "no train or test images" in error(text_only)

    for name, content in [("01.png", b"not a png"), ("01.jpg", b"\xff\xd8\xff not a jpeg"), ("01.png", png_bytes((1, 2, 3))[:40])]:
        tree = write_tree(tmp_path / f"corrupt{name}{len(content)}")
        (tree / "train" / "red" / name).write_bytes(content)
        msg = error(tree)
        assert str(tree / "train" / "red" / name) in msg and "fix or remove that file" in msg
    first = write_tree(tmp_path / "corrupt_first")
    (first / "train" / "blue" / "00.png").write_bytes(b"")
    assert str(first / "train" / "blue" / "00.png") in error(first)


def test_fewer_than_two_classes_is_refused_by_every_source(tmp_path):
    one = write_tree(tmp_path / "one", splits=(("train", {"red": COLOURS["red"]}), ("test", {"red": TEST_COLOURS["red"]})))
    with pytest.raises(UserError) as e:
        load_data({"name": "imagefolder", "path": str(one), "cache": False})
    msg = one_line_error(e)
    assert str(one.absolute()) in msg and "1 class (red)" in msg and "at least 2" in msg
    # the check lives in Dataset, so meta_llr.dataset_from_tensors (and a hand-built Dataset) meet it too
    from meta_llr import dataset_from_tensors

    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(UserError) as e:
        dataset_from_tensors((x, torch.full((4,), 3), x, torch.tensor([0, 1, 2, 3])))
    assert "1 class (3)" in one_line_error(e)
    assert dataset_from_tensors((x, torch.tensor([0, 1, 0, 1]), x, torch.tensor([0, 1, 1, 1]))).num_classes == 2


def test_corrupt_imagefolder_cache_is_rebuilt(tmp_path):
    data = write_tree(tmp_path / "imgs")
    cfg = {"name": "imagefolder", "path": str(data), "root": str(tmp_path / "cache")}
    check_known(load_data(cfg))
    [npz] = cache_files(tmp_path / "cache")
    wrong_layout = io.BytesIO()
    np.savez(wrong_layout, train_x=np.zeros((6, 3)), train_y=np.zeros(6), test_x=np.zeros(2), test_y=np.zeros(2),
             classes=np.array(["red"]))
    for content in (b"garbage", npz.read_bytes()[:200], wrong_layout.getvalue()):
        npz.write_bytes(content)
        with pytest.warns(UserWarning, match="ignoring unreadable cache .*; rebuilding it"):
            check_known(load_data(cfg))
        assert cache_files(tmp_path / "cache") == [npz] and npz.read_bytes() != content


# --------------------------------------------------------------------------- CIFAR


def cifar_image(n):
    """A known [3, 32, 32] image: every byte tells channel, row, column and image."""
    c, h, w = torch.meshgrid(torch.arange(3), torch.arange(32), torch.arange(32), indexing="ij")
    return ((c * 80 + h * 7 + w * 3 + n * 11) % 256).to(torch.uint8)


def cifar_rows(ns):
    # Official layout: each 3072-byte row is the 1024 red, then green, then blue bytes, row-major.
    return np.stack([cifar_image(n).numpy().reshape(-1) for n in ns])


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar10_members():
    out = {}
    for b in range(1, 6):
        ns = [2 * b - 2, 2 * b - 1]
        out[f"data_batch_{b}"] = {b"batch_label": b"x", b"data": cifar_rows(ns), b"labels": [n % 10 for n in ns]}
    out["test_batch"] = {b"data": cifar_rows([100, 101]), b"labels": [7, 3]}
    out["batches.meta"] = {b"label_names": [s.encode() for s in CIFAR10_NAMES], b"num_vis": 3072}
    return {k: pickle.dumps(v, protocol=2) for k, v in out.items()}


def write_tar(path, folder, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def check_cifar10(train, test, classes):
    assert classes == CIFAR10_NAMES
    assert train.x.shape == (10, 3, 32, 32) and train.x.dtype == torch.uint8 and train.x.is_contiguous()
    assert torch.equal(train.x, torch.stack([cifar_image(n) for n in range(10)]))
    assert train.y.tolist() == list(range(10)) and train.y.dtype == torch.int64
    assert torch.equal(test.x, torch.stack([cifar_image(100), cifar_image(101)])) and test.y.tolist() == [7, 3]
    # CHW: byte 0 is red (0,0), byte 1024 is green (0,0), byte 33 is red (1,1).
    assert int(train.x[0, 1, 0, 0]) == 80 and int(train.x[0, 0, 1, 1]) == 10


def test_read_cifar10_from_archive_and_folder(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_tar(archive, "cifar-10-batches-py", cifar10_members())
    check_cifar10(*read_cifar(archive))
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    check_cifar10(*read_cifar(tmp_path / "x"))
    check_cifar10(*read_cifar(tmp_path / "x" / "cifar-10-batches-py"))


def test_read_cifar100_fine_and_coarse(tmp_path):
    members = {
        "train": {b"data": cifar_rows([0, 1, 2]), b"fine_labels": [5, 99, 0], b"coarse_labels": [1, 19, 0]},
        "test": {b"data": cifar_rows([3]), b"fine_labels": [42], b"coarse_labels": [4]},
        "meta": {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                 b"coarse_label_names": [f"c{i}".encode() for i in range(20)]},
    }
    archive = tmp_path / "cifar-100-python.tar.gz"
    write_tar(archive, "cifar-100-python", {k: pickle.dumps(v) for k, v in members.items()})
    train, test, classes = read_cifar(archive, fine_labels=True)
    assert len(classes) == 100 and classes[99] == "f99" and train.y.tolist() == [5, 99, 0] and test.y.tolist() == [42]
    assert torch.equal(train.x[2], cifar_image(2)) and torch.equal(test.x[0], cifar_image(3))
    train, test, classes = read_cifar(archive, fine_labels=False)
    assert len(classes) == 20 and train.y.tolist() == [1, 19, 0]


def test_read_cifar_refuses_foreign_pickles(tmp_path):
    members = cifar10_members()
    members["test_batch"] = pickle.dumps({b"data": cifar_rows([0]), b"labels": [os.getcwd]})
    write_tar(tmp_path / "evil.tar.gz", "cifar-10-batches-py", members)
    with pytest.raises(UserError) as e:
        read_cifar(tmp_path / "evil.tar.gz")
    assert "test_batch" in one_line_error(e)


def test_load_cifar10_from_extracted_root(tmp_path):
    root = tmp_path / "root"
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, payload in cifar10_members().items():
        (folder / name).write_bytes(payload)
    d = load_data({"name": "cifar10", "root": str(root)})  # download would raise (fixture)
    check_cifar10(d.train, d.test, d.classes)
    assert d.name == "cifar10" and d.source == str(folder) and d.image_size == 32 and d.in_channels == 3


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_cifar_is_a_one_line_user_error(tmp_path, name):
    root = tmp_path / "empty"
    with pytest.raises(UserError) as e:
        load_data({"name": name, "root": str(root)})  # download monkeypatched to fail
    msg = one_line_error(e)
    assert str(root) in msg and "download failed" in msg and "data=imagefolder data.path=DIR" in msg
    with pytest.raises(UserError) as e:
        load_data({"name": name, "root": str(root), "download": False})
    msg = one_line_error(e)
    assert "-python.tar.gz" in msg and str(root) in msg and "data=imagefolder data.path=DIR" in msg


def test_bad_cifar_files_are_one_line(tmp_path):
    members = cifar10_members()
    members["batches.meta"] = pickle.dumps({b"names": [b"a"]})
    folder = tmp_path / "root" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, payload in members.items():
        (folder / name).write_bytes(payload)
    with pytest.raises(UserError) as e:
        load_data({"name": "cifar10", "root": str(tmp_path / "root")})
    msg = one_line_error(e)
    assert "batches.meta" in msg and "label_names" in msg and "download the archive again" in msg

    archive = tmp_path / "gz" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    write_tar(archive, "cifar-10-batches-py", cifar10_members())
    archive.write_bytes(archive.read_bytes()[:300])  # truncated gzip stream
    with pytest.raises(UserError) as e:
        read_cifar(archive)
    assert str(archive) in one_line_error(e)
    with pytest.raises(UserError) as e:  # damaged archive in data.root, no download allowed: md5 checked here
        load_data({"name": "cifar10", "root": str(archive.parent), "download": False})
    msg = one_line_error(e)
    assert str(archive) in msg and "damaged" in msg and "data.download=true" in msg

    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError) as e:
        load_data({"name": "cifar10", "root": str(tmp_path / "file")})
    assert one_line_error(e).startswith(f"data.root '{tmp_path / 'file'}' is a file, not a folder")


# --------------------------------------------------------------------------- augment


def gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def test_augment_identity():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert augment(x, 0, False, gen(0)) is x


def test_augment_flip_matches_torch_flip():
    x = torch.randint(0, 256, (64, 3, 6, 5), dtype=torch.uint8)
    out = augment(x, 0, True, gen(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    flipped = torch.tensor([torch.equal(o, torch.flip(xi, dims=[2])) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped ^ kept).all())  # every sample is one or the other (random x is not symmetric)
    assert 10 < int(flipped.sum()) < 54
    # The coin is the documented draw: torch.rand(B) < 0.5.
    assert torch.equal(flipped, torch.rand(64, generator=gen(0)) < 0.5)
    assert torch.equal(augment(x, 0, True, gen(0)), out)


def test_augment_crop_moves_a_bright_pixel_by_the_drawn_offset():
    b, p, size, r, c = 200, 2, 9, 4, 3
    x = torch.zeros(b, 1, size, size, dtype=torch.uint8)
    x[:, 0, r, c] = 255
    out = augment(x, p, False, gen(5))
    g = gen(5)
    top = torch.randint(0, 2 * p + 1, (b,), generator=g)
    left = torch.randint(0, 2 * p + 1, (b,), generator=g)
    want = torch.zeros_like(x)
    want[torch.arange(b), 0, r + p - top, c + p - left] = 255
    assert torch.equal(out, want)
    offsets = {(int(t) - p, int(l) - p) for t, l in zip(top, left)}
    assert offsets == {(i, j) for i in range(-p, p + 1) for j in range(-p, p + 1)}


def shifted(img, dy, dx):
    """img moved down by dy and right by dx, zeros shifted in."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_crop_is_a_zero_filled_shift(dtype):
    p = 3
    x = (torch.randint(1, 256, (32, 3, 7, 6))).to(dtype)
    out = augment(x, p, True, gen(1))
    assert out.shape == x.shape and out.dtype == dtype
    for o, xi in zip(out, x):
        candidates = [shifted(v, dy, dx) for v in (xi, xi.flip(-1)) for dy in range(-p, p + 1) for dx in range(-p, p + 1)]
        assert any(torch.equal(o, cand) for cand in candidates)
    assert torch.equal(augment(x, p, True, gen(1)), out)
    assert not torch.equal(augment(x, p, True, gen(2)), out)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_reflect_crop_equals_torch_reflect_padding(dtype):
    b, p = 64, 2
    x = torch.randint(0, 256, (b, 3, 7, 6)).to(dtype)
    out = augment(x, p, False, gen(3), reflect=True)
    g = gen(3)
    top = torch.randint(0, 2 * p + 1, (b,), generator=g)
    left = torch.randint(0, 2 * p + 1, (b,), generator=g)
    padded = torch.nn.functional.pad(x.float(), (p, p, p, p), mode="reflect")
    want = torch.stack([padded[i, :, top[i]:top[i] + 7, left[i]:left[i] + 6] for i in range(b)])
    assert out.dtype == dtype and torch.equal(out.float(), want)
    assert not torch.equal(augment(x, p, False, gen(3)), out)  # zeros shifted in differ


def test_augment_mirror_mask_replaces_the_coin():
    x = torch.randint(0, 256, (8, 3, 5, 5), dtype=torch.uint8)
    mirror = torch.tensor([True, False] * 4)
    out = augment(x, 0, True, gen(0), mirror=mirror)
    assert torch.equal(out, torch.where(mirror[:, None, None, None], x.flip(-1), x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_on_cuda_without_sync():
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = augment(x, 4, True, gen(0, "cuda"))
        out_f = augment(x.float(), 4, True, gen(0, "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.device.type == "cuda" and out.dtype == torch.uint8
    assert torch.equal(out.float(), out_f)
