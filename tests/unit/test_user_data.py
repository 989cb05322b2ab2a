"""User datasets: each format (IDX, .npz, ImageFolder), the held-out split, every bad-input case, the model shape
check, the content digest, `hfgan data check --config` and `hfgan train` exiting 2 with one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hfgan_core.cli import main
from hfgan_core.config import ConfigError, DomainConfig, ModelConfig, RunConfig, ScenarioConfig, dump_toml, load_config
from hfgan_core.data.domain import content_digest, load_domain_config
from hfgan_core.data.imageset import ImageSet
from hfgan_core.data.partition import load_scenario_data
from hfgan_core.data.synthetic import synthetic_colour_split, synthetic_split
from hfgan_core.data.user import load_user_dataset
from tests.userdata import write_idx_dir, write_npz, write_png_folder


def gray(n_per_class: int = 3, train: bool = True) -> ImageSet:
    return synthetic_split(n_per_class, train)


def colour(n_per_class: int = 2, train: bool = True) -> ImageSet:
    return synthetic_colour_split(n_per_class, train)


def dom(path: Path, fmt: str, fraction: float | None = None, name: str = "mine", clients: int = 2) -> DomainConfig:
    return DomainConfig(name, clients, path=str(path), format=fmt, test_fraction=fraction)


def same(a: ImageSet, b: ImageSet) -> bool:
    return torch.equal(a.pixels, b.pixels) and torch.equal(a.labels, b.labels)


def error(d: DomainConfig, data_dir: Path = Path("/nonexistent")) -> str:
    with pytest.raises(ConfigError) as info:
        load_user_dataset(d, data_dir)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------ the formats


@pytest.mark.parametrize("gz", [True, False])
def test_idx_with_both_splits(tmp_path, gz):
    tr, te = gray(4), gray(2, train=False)
    root = write_idx_dir(tmp_path / "idx", tr, te, gz=gz)
    train, test = load_user_dataset(dom(root, "idx"), tmp_path)
    assert same(train, tr) and same(test, te)
    assert train.image_shape == (1, 28, 28)


def test_idx_test_file_only_is_split_by_fraction_per_class(tmp_path):
    data = gray(10, train=False)  # 100 images, 10 per class
    root = write_idx_dir(tmp_path / "kmnist", None, data)
    train, test = load_user_dataset(dom(root, "idx", 0.2), tmp_path)
    assert (len(train), len(test)) == (80, 20)
    assert np.bincount(test.labels_numpy()).tolist() == [2] * 10
    # A partition of the file: together the two splits are the file's images, each once.
    both = torch.cat([train.pixels, test.pixels]).reshape(100, -1)
    assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, data.pixels.reshape(100, -1).numpy()))
    # The same split every time (it is part of the dataset's definition).
    again = load_user_dataset(dom(root, "idx", 0.2), tmp_path)
    assert same(again[0], train) and same(again[1], test)


def test_relative_path_is_under_the_data_directory(tmp_path):
    write_idx_dir(tmp_path / "data" / "mine", gray(2), gray(1, False))
    train, _ = load_user_dataset(dom(Path("mine"), "idx"), tmp_path / "data")
    assert len(train) == 20


def test_npz_with_and_without_test(tmp_path):
    tr, te = colour(3), colour(1, False)
    train, test = load_user_dataset(dom(write_npz(tmp_path / "a.npz", tr, te), "npz"), tmp_path)
    assert same(train, tr) and same(test, te) and train.image_shape == (3, 32, 32)
    train, test = load_user_dataset(dom(write_npz(tmp_path / "b.npz", tr), "npz", 1 / 3), tmp_path)
    assert (len(train), len(test)) == (20, 10)


def test_npz_grayscale_with_channel_axis(tmp_path):
    tr, te = gray(2), gray(1, False)
    path = tmp_path / "g.npz"
    np.savez(
        path,
        x_train=tr.pixels.numpy()[..., None],
        y_train=tr.labels.numpy(),
        x_test=te.pixels.numpy()[..., None],
        y_test=te.labels.numpy(),
    )
    train, _ = load_user_dataset(dom(path, "npz"), tmp_path)
    assert same(train, tr)


def test_imagefolder_rgb_train_test_layout(tmp_path):
    tr, te = colour(2), colour(1, False)
    write_png_folder(tmp_path / "pics" / "train", tr)
    write_png_folder(tmp_path / "pics" / "test", te)
    train, test = load_user_dataset(dom(tmp_path / "pics", "imagefolder"), tmp_path)
    assert train.image_shape == (3, 32, 32) and len(train) == 20 and len(test) == 10
    # PNG is lossless: the class-sorted images are the originals.
    order = np.argsort(tr.labels_numpy(), kind="stable")
    assert torch.equal(train.pixels, tr.pixels[torch.from_numpy(order)])


def test_imagefolder_grayscale_and_class_names(tmp_path):
    names = [f"{chr(ord('a') + k)}-glyph" for k in range(10)]
    write_png_folder(tmp_path / "pics", gray(3), classes=names)
    train, test = load_user_dataset(dom(tmp_path / "pics", "imagefolder", 1 / 3), tmp_path)
    assert train.image_shape == (1, 28, 28) and (len(train), len(test)) == (20, 10)


def test_imagefolder_jpeg_and_non_images_ignored(tmp_path):
    from PIL import Image

    root = tmp_path / "pics"
    for k in range(2):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (40 * i, 100 * k, 7)).save(root / f"c{k}" / f"{i}.JPG")
        (root / f"c{k}" / "notes.txt").write_text("not an image")
    train, test = load_user_dataset(dom(root, "imagefolder", 1 / 3), tmp_path)
    assert train.image_shape == (3, 32, 32) and len(train) + len(test) == 6 and train.num_classes == 2


def test_synthetic_colour_dataset_is_deterministic_and_colourful():
    a, b = colour(5), colour(5)
    assert same(a, b) and a.image_shape == (3, 32, 32) and a.num_classes == 10
    assert not torch.equal(a.pixels[:, 0], a.pixels[:, 1])  # not gray in three planes


# --------------------------------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    assert "not found" in error(dom(tmp_path / "nope", "npz"))


def test_mixed_sizes_in_imagefolder(tmp_path):
    from PIL import Image

    root = tmp_path / "pics"
    for k in range(2):
        (root / f"c{k}").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(root / "c0" / "a.png")
    Image.new("RGB", (28, 28)).save(root / "c1" / "b.png")
    msg = error(dom(root, "imagefolder", 0.5))
    assert "mixed image sizes" in msg and "b.png" in msg


def test_mixed_sizes_between_train_and_test(tmp_path):
    path = tmp_path / "m.npz"
    tr, te = colour(2), colour(1, False)
    np.savez(
        path,
        x_train=tr.pixels.numpy().transpose(0, 2, 3, 1),
        y_train=tr.labels.numpy(),
        x_test=gray(1, False).pixels.numpy(),
        y_test=te.labels.numpy(),
    )
    assert "mixed image sizes" in error(dom(path, "npz"))


def test_unreadable_image_file(tmp_path):
    root = write_png_folder(tmp_path / "pics", colour(1))
    victim = next((root / "class_03").iterdir())
    victim.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    msg = error(dom(root, "imagefolder", 0.5))
    assert "unreadable image file" in msg and victim.name in msg


def test_unreadable_npz(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"PK\x03\x04 garbage")
    assert "cannot read" in error(dom(path, "npz", 0.5))


def test_npz_with_pickled_arrays_is_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, x_train=np.array([object()], dtype=object), y_train=np.zeros(1, np.uint8))
    assert "cannot read" in error(dom(path, "npz", 0.5))


def test_npz_missing_key_and_half_test_split(tmp_path):
    tr = colour(1)
    path = tmp_path / "k.npz"
    np.savez(path, x_train=tr.pixels.numpy())
    assert "no y_train" in error(dom(path, "npz", 0.5))
    np.savez(path, x_train=tr.pixels.numpy(), y_train=tr.labels.numpy(), x_test=tr.pixels.numpy())
    assert "both x_test and y_test" in error(dom(path, "npz"))


def test_npz_float_images_and_wrong_label_count(tmp_path):
    tr = gray(1)
    path = tmp_path / "f.npz"
    np.savez(path, x_train=tr.pixels.numpy().astype(np.float32), y_train=tr.labels.numpy())
    assert "must be uint8" in error(dom(path, "npz", 0.5))
    np.savez(path, x_train=tr.pixels.numpy(), y_train=tr.labels.numpy()[:-1])
    assert "10 images but 9 labels" in error(dom(path, "npz", 0.5))


def test_class_with_no_images_in_imagefolder(tmp_path):
    root = write_png_folder(tmp_path / "pics", colour(1))
    (root / "class_10_empty").mkdir()
    msg = error(dom(root, "imagefolder", 0.5))
    assert "class 'class_10_empty' has no images" in msg


def test_no_class_directories(tmp_path):
    (tmp_path / "pics").mkdir()
    assert "no class directories" in error(dom(tmp_path / "pics", "imagefolder", 0.5))


def test_class_with_no_images_by_label(tmp_path):
    tr = gray(2)
    labels = tr.labels.numpy().copy()
    labels[labels == 4] = 5  # label 4 never occurs, 9 does
    path = tmp_path / "gap.npz"
    np.savez(path, x_train=tr.pixels.numpy(), y_train=labels)
    assert "class 4 has no images" in error(dom(path, "npz", 0.5))


def test_labels_out_of_range(tmp_path):
    tr, te = gray(2), gray(1, False)
    path = tmp_path / "neg.npz"
    labels = tr.labels.numpy().astype(np.int64)
    labels[0] = -1
    np.savez(path, x_train=tr.pixels.numpy(), y_train=labels)
    assert "label -1 out of range" in error(dom(path, "npz", 0.5))
    test_labels = te.labels.numpy().copy()
    test_labels[3] = 12
    np.savez(path, x_train=tr.pixels.numpy(), y_train=tr.labels.numpy(), x_test=te.pixels.numpy(), y_test=test_labels)
    assert "test label 12 out of range 0..9" in error(dom(path, "npz"))
    np.savez(path, x_train=tr.pixels.numpy(), y_train=np.full(20, 5000, np.int64))
    assert "out of range" in error(dom(path, "npz", 0.5))


def test_imagefolder_test_class_unknown_to_training(tmp_path):
    write_png_folder(tmp_path / "pics" / "train", colour(1))
    write_png_folder(tmp_path / "pics" / "test", colour(1, False), classes=[f"other_{k}" for k in range(10)])
    assert "has no training images" in error(dom(tmp_path / "pics", "imagefolder"))


def test_test_split_missing_or_given_twice(tmp_path):
    root = write_idx_dir(tmp_path / "one", None, gray(1, False))
    assert "has no test split; set test_fraction" in error(dom(root, "idx"))
    root = write_idx_dir(tmp_path / "two", gray(1), gray(1, False))
    assert "test_fraction applies only" in error(dom(root, "idx", 0.2))


def test_idx_problems(tmp_path):
    root = write_idx_dir(tmp_path / "idx", gray(1), None)
    (root / "train-labels-idx1-ubyte.gz").unlink()
    assert "train-labels-idx1-ubyte[.gz] missing" in error(dom(root, "idx", 0.5))
    (tmp_path / "empty").mkdir()
    assert "no train-/t10k-images" in error(dom(tmp_path / "empty", "idx", 0.5))
    root = write_idx_dir(tmp_path / "trunc", gray(1), None, gz=False)
    f = root / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-5])
    assert "truncated IDX data" in error(dom(root, "idx", 0.5))


def test_fraction_that_leaves_a_split_empty(tmp_path):
    path = write_npz(tmp_path / "tiny.npz", gray(1))  # one image per class
    assert "leaves an empty" in error(dom(path, "npz", 0.2))


# --------------------------------------------------------------------------------------- config and the model


def _cfg(*domains: DomainConfig, data_dir: Path) -> RunConfig:
    cfg = RunConfig(scenario=ScenarioConfig(domains=tuple(domains)))
    return cfg.with_overrides("runtime", data_dir=str(data_dir)).validate()


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"dataset": "MNIST", "path": "x", "format": "npz"}, "is a built-in dataset"),
        ({"dataset": "mine", "path": "x", "format": "tar"}, "is not one of idx, npz, imagefolder"),
        ({"dataset": "mine", "path": "x", "format": "npz", "test_fraction": 1.0}, "between 0 and 1"),
        ({"dataset": "MNIST", "format": "npz"}, "need a 'path'"),
        ({"dataset": "my data!", "path": "x", "format": "npz"}, "use 1-64 letters"),
        ({"dataset": "mine"}, "unknown dataset 'mine'"),
    ],
)
def test_domain_config_errors(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        DomainConfig(clients=1, **kwargs).validate("scenario.domains[0]")


def test_config_toml_round_trip_and_unchanged_digest_of_builtin_domains(tmp_path):
    d = dom(tmp_path / "x.npz", "npz", 0.25)
    cfg = _cfg(d, data_dir=tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(path) == cfg
    # Built-in domains have no user keys in their plain form, so their digests are what they were.
    plain = load_config("quickstart").to_dict()
    assert all(set(x) == {"dataset", "clients", "samples_per_client"} for x in plain["scenario"]["domains"])


def test_model_is_checked_against_the_data_or_adopts_it(tmp_path):
    path = write_npz(tmp_path / "c.npz", colour(3), colour(1, False))
    cfg = _cfg(dom(path, "npz"), data_dir=tmp_path)
    with pytest.raises(ConfigError, match="set \\[model\\] image_size = 32, channels = 3, num_classes = 10"):
        load_scenario_data(cfg)
    data = load_scenario_data(cfg, adopt_model_shape=True)
    assert (data.model.image_size, data.model.channels, data.model.num_classes) == (32, 3, 10)
    fitted = cfg.replace(model=data.model)
    assert load_scenario_data(fitted).model == data.model


def test_model_family_refuses_other_sizes_and_mixed_domains(tmp_path):
    px = np.zeros((4, 30, 30), np.uint8)
    np.savez(tmp_path / "odd.npz", x_train=px, y_train=np.array([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match="30x30 images; the model family takes square images of 28, 32, 64"):
        load_scenario_data(
            _cfg(dom(tmp_path / "odd.npz", "npz", 0.5, clients=1), data_dir=tmp_path), adopt_model_shape=True
        )
    path = write_npz(tmp_path / "c.npz", colour(3), colour(1, False))
    cfg = _cfg(DomainConfig("synthetic", 1), dom(path, "npz"), data_dir=tmp_path)
    with pytest.raises(ConfigError, match="differ in shape"):
        load_scenario_data(cfg, adopt_model_shape=True)
    with pytest.raises(ConfigError, match="image_size: 30 is not supported"):
        ModelConfig(image_size=30).validate()


def test_too_few_samples_for_the_clients(tmp_path):
    path = write_npz(tmp_path / "c.npz", colour(1), colour(1, False))  # 10 training images
    with pytest.raises(ConfigError, match="12 clients for the 10 training samples of mine"):
        load_scenario_data(_cfg(dom(path, "npz", clients=12), data_dir=tmp_path), adopt_model_shape=True)


def test_content_digest_ties_a_result_to_its_data(tmp_path):
    tr, te = colour(3), colour(1, False)
    path = write_npz(tmp_path / "c.npz", tr, te)
    cfg = _cfg(dom(path, "npz"), DomainConfig("synthetic-colour", 1), data_dir=tmp_path)
    data = load_scenario_data(cfg, adopt_model_shape=True)
    assert data.digests["mine"] == content_digest(tr, te)
    assert data.digests["mine"].startswith("sha256:") and data.digests["mine"] != data.digests["synthetic-colour"]
    pixels = tr.pixels.clone()
    pixels[0, 0, 0, 0] ^= 1
    changed = dataclasses.replace(tr, pixels=pixels)
    assert content_digest(changed, te) != content_digest(tr, te)
    # The same data read through another format has the same digest.
    write_png_folder(tmp_path / "f" / "train", tr)
    write_png_folder(tmp_path / "f" / "test", te)
    via_png = load_domain_config(dom(tmp_path / "f", "imagefolder"), tmp_path)
    order_tr = torch.from_numpy(np.argsort(tr.labels_numpy(), kind="stable"))
    order_te = torch.from_numpy(np.argsort(te.labels_numpy(), kind="stable"))
    assert content_digest(via_png.train, via_png.test) == content_digest(tr.subset(order_tr), te.subset(order_te))


# ------------------------------------------------------------------------------------------------------- CLI


def _toml(tmp_path: Path, domain: str) -> Path:
    path = tmp_path / "user.toml"
    path.write_text('[scenario]\nname = "user"\n\n[[scenario.domains]]\n' + domain + "\n\n[train]\nrounds = 1\n")
    return path


def test_data_check_reports_user_datasets(tmp_path, capsys):
    path = write_npz(tmp_path / "c.npz", colour(2), colour(1, False))
    cfg = _toml(tmp_path, f'dataset = "mine"\nclients = 2\npath = "{path}"\nformat = "npz"')
    assert main(["data", "check", "--data-dir", str(tmp_path), "--config", str(cfg), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["mine"]["found"] and not rows["mine"]["corrupt"]
    assert "20 train / 10 test" in rows["mine"]["detail"] and "32x32x3" in rows["mine"]["detail"]
    assert content_digest(colour(2), colour(1, False)) in rows["mine"]["detail"]
    path.write_bytes(b"garbage")
    assert main(["data", "check", "--data-dir", str(tmp_path), "--config", str(cfg)]) == 1
    assert "CORRUPT" in capsys.readouterr().out


def test_train_with_a_bad_user_dataset_exits_2_with_one_line(tmp_path, capsys):
    root = write_png_folder(tmp_path / "pics", colour(1))
    (root / "class_05" / "broken.png").write_bytes(b"nope")
    cfg = _toml(
        tmp_path, f'dataset = "mine"\nclients = 2\npath = "{root}"\nformat = "imagefolder"\ntest_fraction = 0.5'
    )
    code = main(["train", "--config", str(cfg), "--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unreadable image file" in err and "broken.png" in err
    assert not (tmp_path / "run").exists()
