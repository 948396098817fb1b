"""Tests for lckd_kit.data: layouts, label conventions, geometry, validation and pipelines.

Every case is a tiny (8, 9, 10) volume written with nibabel into tmp_path.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lckd_kit import MODALITIES
from monai.transforms import Compose

from lckd_kit.data import Case, LoadCased, as_case, find_cases, load_case, load_cases, save_prediction
from lckd_kit.labels import CONVENTIONS, labels_to_regions, regions_to_labels
from lckd_kit.transforms import normalize_image, train_transforms, val_transforms

SHAPE = (8, 9, 10)
SUFFIX_2023 = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------- fixtures


def write_nii(path: Path, data: np.ndarray, affine: np.ndarray = np.eye(4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def brain_image(value: float, shape=SHAPE, dtype=np.int16) -> np.ndarray:
    """Constant ``value`` inside a central box (the "brain"), 0 outside."""
    img = np.zeros(shape, dtype=dtype)
    img[1:-1, 1:-1, 1:-1] = value
    return img


def label_volume(values=(0, 1, 2, 4), shape=SHAPE) -> np.ndarray:
    """Each label value in its own axial slab of a central column, background elsewhere."""
    lab = np.zeros(shape, dtype=np.uint8)
    for z, v in enumerate(values):
        lab[3:5, 3:6, 2 + z] = v
    return lab


def write_brats(folder: Path, name: str, style="2018", ext=".nii.gz", label=None, affine=np.eye(4),
                images=None) -> Path:
    """Write one BraTS case; modality m holds the constant 10 * (index + 1) inside the brain."""
    folder = folder / name
    for i, m in enumerate(MODALITIES):
        suffix = f"_{m}" if style == "2018" else f"-{SUFFIX_2023[m]}"
        data = brain_image(10 * (i + 1)) if images is None else images[m]
        write_nii(folder / f"{name}{suffix}{ext}", data, affine)
    if label is not None:
        seg = "_seg" if style == "2018" else "-seg"
        write_nii(folder / f"{name}{seg}{ext}", label, affine)
    return folder


def write_msd(root: Path, modality: dict, n_train=2, n_labelled=2, n_test=1, affine=np.eye(4), channels=4) -> Path:
    """MSD Task01 layout; channel c of every image holds the constant 100 + c inside the brain."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"name": "BRATS", "modality": modality}))
    img = np.stack([brain_image(100 + c) for c in range(channels)], axis=-1)
    for i in range(n_train + n_test):
        sub = "imagesTr" if i < n_train else "imagesTs"
        write_nii(root / sub / f"BRATS_{i:03d}.nii.gz", img, affine)
        if i < n_labelled:
            write_nii(root / "labelsTr" / f"BRATS_{i:03d}.nii.gz", label_volume((0, 1, 2, 3)), affine)
    return root


MSD_SHUFFLED = {"0": "T1w", "1": "FLAIR", "2": "T2w", "3": "t1gd"}


# ---------------------------------------------------------------------------------- find_cases


def test_find_brats2018_hgg_lgg_uncompressed(tmp_path):
    write_brats(tmp_path / "HGG", "Brats18_CBICA_AAA_1", ext=".nii", label=label_volume())
    write_brats(tmp_path / "LGG", "Brats18_TCIA_BBB_1", ext=".nii", label=label_volume())
    # macOS junk and non-NIfTI files must be ignored
    (tmp_path / "HGG" / "Brats18_CBICA_AAA_1" / "._Brats18_CBICA_AAA_1_flair.nii").write_bytes(b"\0junk")
    (tmp_path / "HGG" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "name_mapping.csv").write_text("a,b\n")

    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["Brats18_CBICA_AAA_1", "Brats18_TCIA_BBB_1"]
    assert {c.layout for c in cases} == {"brats2018"}
    assert {c.convention for c in cases} == {"brats2018"}
    assert all(c.labelled for c in cases)
    # "_t1" must not swallow "_t1ce"
    files = cases[0].image_files
    assert files["t1"].name == "Brats18_CBICA_AAA_1_t1.nii"
    assert files["t1ce"].name == "Brats18_CBICA_AAA_1_t1ce.nii"
    assert cases[0].label_file.name == "Brats18_CBICA_AAA_1_seg.nii"


def test_find_brats2020_flat_unlabelled_and_fallback_seg(tmp_path):
    write_brats(tmp_path, "BraTS20_Training_001", label=label_volume())
    write_brats(tmp_path, "BraTS20_Validation_001")  # no seg: unlabelled but valid
    # BraTS 2020 case 355: the seg has an unrelated name
    folder = write_brats(tmp_path, "BraTS20_Training_355", ext=".nii")
    write_nii(folder / "W39_1998.09.19_Segm.nii", label_volume())

    cases = {c.name: c for c in find_cases(tmp_path)}
    assert sorted(cases) == ["BraTS20_Training_001", "BraTS20_Training_355", "BraTS20_Validation_001"]
    assert cases["BraTS20_Training_001"].labelled
    assert not cases["BraTS20_Validation_001"].labelled
    assert cases["BraTS20_Validation_001"].label_file is None
    assert cases["BraTS20_Training_355"].label_file.name == "W39_1998.09.19_Segm.nii"


def test_find_brats2023_hyphen_naming_and_convention_override(tmp_path):
    write_brats(tmp_path, "BraTS-GLI-00000-000", style="2023", label=label_volume((0, 1, 2, 3)))
    write_brats(tmp_path, "BraTS-GLI-00002-000", style="2023", label=label_volume((0, 1, 2, 3)))

    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["BraTS-GLI-00000-000", "BraTS-GLI-00002-000"]
    assert {(c.layout, c.convention) for c in cases} == {("brats2023", "brats2023")}
    names = {m: p.name for m, p in cases[0].image_files.items()}
    assert names == {"flair": "BraTS-GLI-00000-000-t2f.nii.gz", "t1": "BraTS-GLI-00000-000-t1n.nii.gz",
                     "t1ce": "BraTS-GLI-00000-000-t1c.nii.gz", "t2": "BraTS-GLI-00000-000-t2w.nii.gz"}
    assert {c.convention for c in find_cases(tmp_path, convention="brats2024gli")} == {"brats2024gli"}
    with pytest.raises(ValueError, match="unknown label convention"):
        find_cases(tmp_path, convention="brats2019")


def test_find_msd_with_shuffled_channels_and_test_images(tmp_path):
    root = write_msd(tmp_path / "Task01_BrainTumour", MSD_SHUFFLED, n_train=3, n_labelled=2, n_test=1)
    (root / "imagesTr" / "._BRATS_000.nii.gz").write_bytes(b"\0junk")
    (root / "labelsTr" / "._BRATS_000.nii.gz").write_bytes(b"\0junk")

    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["BRATS_000", "BRATS_001", "BRATS_002", "BRATS_003"]
    assert [c.labelled for c in cases] == [True, True, False, False]
    assert {(c.layout, c.convention) for c in cases} == {("msd", "msd")}
    assert cases[0].channel_index == {"t1": 0, "flair": 1, "t2": 2, "t1ce": 3}
    assert cases[3].image_files["flair"].parent.name == "imagesTs"


def test_find_mixed_layouts_in_one_tree(tmp_path):
    write_brats(tmp_path / "a", "Brats18_X_1", label=label_volume())
    write_brats(tmp_path / "b", "BraTS-GLI-00005-000", style="2023")
    write_msd(tmp_path / "c" / "Task01_BrainTumour", MSD_SHUFFLED, n_train=1, n_labelled=1, n_test=0)
    cases = find_cases(tmp_path)
    assert [(c.name, c.layout) for c in cases] == [
        ("BRATS_000", "msd"), ("BraTS-GLI-00005-000", "brats2023"), ("Brats18_X_1", "brats2018")]


def test_find_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_cases(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        find_cases(tmp_path / "empty")
    folder = write_brats(tmp_path / "data", "BraTS2021_00000", label=label_volume())
    (folder / "BraTS2021_00000_t1ce.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t1ce") as err:
        find_cases(tmp_path / "data")
    assert str(folder) in str(err.value)


def test_find_msd_bad_dataset_json(tmp_path):
    write_msd(tmp_path, {"0": "FLAIR", "1": "T1w", "2": "PD", "3": "T2w"})
    with pytest.raises(ValueError, match="dataset.json.*PD"):
        find_cases(tmp_path)


# ---------------------------------------------------------------------------------- conventions

# value -> (ET, TC, WT) membership, written out by hand from DATA_SPEC "R"
EXPECTED_REGIONS = {
    "brats2018": {0: (0, 0, 0), 1: (0, 1, 1), 2: (0, 0, 1), 4: (1, 1, 1)},
    "brats2023": {0: (0, 0, 0), 1: (0, 1, 1), 2: (0, 0, 1), 3: (1, 1, 1)},
    "brats2024gli": {0: (0, 0, 0), 1: (0, 1, 1), 2: (0, 0, 1), 3: (1, 1, 1), 4: (0, 0, 0)},
    "msd": {0: (0, 0, 0), 1: (0, 0, 1), 2: (0, 1, 1), 3: (1, 1, 1)},  # MSD 1 is edema: not in TC
}


@pytest.mark.parametrize("convention", sorted(EXPECTED_REGIONS))
def test_labels_to_regions_voxel_by_voxel(convention):
    table = EXPECTED_REGIONS[convention]
    labels = label_volume(tuple(table))
    regions = labels_to_regions(labels, convention)
    assert regions.shape == (3,) + SHAPE and regions.dtype == np.uint8
    expected = np.zeros_like(regions)
    for value, member in table.items():
        expected[:, labels == value] = np.array(member, dtype=np.uint8)[:, None]
    np.testing.assert_array_equal(regions, expected)
    assert set(CONVENTIONS[convention].values) == set(table)


@pytest.mark.parametrize("convention,bad", [("brats2018", [3]), ("brats2018", [3, 5]), ("brats2023", [4]),
                                            ("msd", [4]), ("brats2024gli", [5])])
def test_labels_to_regions_rejects_unknown_values(convention, bad):
    labels = label_volume((0, 1, *bad))
    with pytest.raises(ValueError, match=f"label values {bad}".replace("[", r"\[").replace("]", r"\]")):
        labels_to_regions(labels, convention)


@pytest.mark.parametrize("convention", sorted(EXPECTED_REGIONS))
def test_regions_to_labels_inverts_and_enforces_nesting(convention):
    conv = CONVENTIONS[convention]
    values = sorted(conv.values - {4} if convention == "brats2024gli" else conv.values)  # RC is in no region
    labels = label_volume(tuple(values))
    np.testing.assert_array_equal(regions_to_labels(labels_to_regions(labels, convention), convention), labels)
    # un-nested masks: lone ET -> enhancing, lone TC -> necrosis (1 for BraTS, 2 for MSD), lone WT -> edema
    regions = np.zeros((3, 3), dtype=np.uint8)
    regions[0, 0] = regions[1, 1] = regions[2, 2] = 1
    necrosis = 2 if convention == "msd" else 1
    edema = 1 if convention == "msd" else 2
    enhancing = 4 if convention == "brats2018" else 3
    np.testing.assert_array_equal(regions_to_labels(regions, convention), [enhancing, necrosis, edema])


# ---------------------------------------------------------------------------------- load_case


def test_modality_order_brats2018_and_2023(tmp_path):
    for style, name in (("2018", "Brats18_A_1"), ("2023", "BraTS-GLI-00000-000")):
        write_brats(tmp_path / style, name, style=style, label=label_volume((0, 1, 2, 4 if style == "2018" else 3)))
        d = load_case(find_cases(tmp_path / style)[0])
        assert d["image"].shape == (4,) + SHAPE and d["image"].dtype == np.float32
        for i, m in enumerate(MODALITIES):
            assert d["image"][i, 4, 4, 4] == 10 * (i + 1), (style, m)
            assert d["image"][i, 0, 0, 0] == 0
        assert d["label"].shape == (3,) + SHAPE and d["label"].dtype == np.uint8
        assert d["label"][:, 3, 3, 5].tolist() == [1, 1, 1]  # slab z=5 holds ET (4 or 3)


def test_modality_order_msd_from_dataset_json(tmp_path):
    write_msd(tmp_path, MSD_SHUFFLED, n_train=1, n_labelled=1, n_test=0)
    d = load_case(find_cases(tmp_path)[0])
    # channel c holds 100 + c; dataset.json says 0 T1w, 1 FLAIR, 2 T2w, 3 t1gd
    assert d["image"][:, 4, 4, 4].tolist() == [101, 100, 103, 102]  # flair, t1, t1ce, t2
    assert d["label"][:, 3, 3, 3].tolist() == [0, 0, 1]  # MSD 1 = edema: WT only
    assert d["label"][:, 3, 3, 4].tolist() == [0, 1, 1]  # MSD 2 = non-enhancing: TC, WT
    assert d["convention"] == "msd"


def test_brats2024_resection_cavity_excluded(tmp_path):
    write_brats(tmp_path, "BraTS-GLI-02000-100", style="2023", label=label_volume((0, 1, 2, 3, 4)))
    with pytest.raises(ValueError, match=r"label values \[4\]"):
        load_case(find_cases(tmp_path)[0])  # default brats2023 convention
    d = load_case(find_cases(tmp_path, convention="brats2024gli")[0])
    assert d["label"][:, 3, 3, 6].tolist() == [0, 0, 0]  # RC slab
    assert d["label"][:, 3, 3, 5].tolist() == [1, 1, 1]  # ET slab


def test_lps_case_loads_as_ras(tmp_path):
    affine = LPS.copy()
    affine[:3, 3] = (7.0, 8.0, -5.0)
    images = {m: brain_image(10) for m in MODALITIES}
    images["flair"][1, 2, 3] = 99
    write_brats(tmp_path, "BraTS20_Training_010", label=label_volume(), affine=affine, images=images)
    d = load_case(find_cases(tmp_path)[0])

    assert nib.aff2axcodes(d["affine"]) == ("R", "A", "S")
    np.testing.assert_allclose(np.diag(d["affine"])[:3], [1, 1, 1])
    assert d["image"].shape == (4,) + SHAPE
    assert d["image"][0, 8 - 1 - 1, 9 - 1 - 2, 3] == 99  # x and y flipped
    world = affine @ [1, 2, 3, 1]
    np.testing.assert_allclose(d["affine"] @ [6, 6, 3, 1], world)  # same point in space
    np.testing.assert_array_equal(d["original_affine"], affine)
    assert d["original_shape"] == SHAPE
    assert d["spacing"] == (1.0, 1.0, 1.0)
    assert load_case(find_cases(tmp_path)[0], reorient=False)["image"][0, 1, 2, 3] == 99  # file order kept


# permuted, flipped axes with anisotropic spacing: the hardest orientation to write back
PERMUTED = np.array([[0.0, 0, -2, 10], [-1.5, 0, 0, 4], [0, 1, 0, -3], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine", [LPS, PERMUTED], ids=["lps", "permuted"])
def test_round_trip_brats(tmp_path, affine):
    labels = label_volume()
    labels[0, 0, 0] = 2  # an asymmetric mark so a flip would show
    write_brats(tmp_path / "in", "Brats18_A_1", ext=".nii", label=labels, affine=affine)
    d = load_case(find_cases(tmp_path / "in")[0])
    if affine is PERMUTED:
        assert d["image"].shape == (4, 10, 8, 9)
        np.testing.assert_allclose(d["spacing"], (2.0, 1.5, 1.0))
    out = save_prediction(d["label"], d, tmp_path / "out" / "pred.nii.gz")
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), labels)
    np.testing.assert_allclose(back.affine, affine)
    assert [p.name for p in out.parent.iterdir()] == ["pred.nii.gz"]  # no temporary left behind


def test_round_trip_msd(tmp_path):
    write_msd(tmp_path, MSD_SHUFFLED, n_train=1, n_labelled=1, n_test=0, affine=LPS)
    case = find_cases(tmp_path)[0]
    d = load_case(case)
    out = save_prediction(torch.from_numpy(d["label"]).float(), d, tmp_path / "pred.nii")
    original = np.asanyarray(nib.load(str(case.label_file)).dataobj)
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(out)).dataobj), original)
    with pytest.raises(ValueError, match="spatial shape"):
        save_prediction(d["label"][:, :-1], d, tmp_path / "bad.nii.gz")


def test_unlabelled_case_loads_with_label_none(tmp_path):
    write_brats(tmp_path, "BraTS20_Validation_001")
    d = load_case(find_cases(tmp_path)[0])
    assert d["label"] is None and d["image"].shape == (4,) + SHAPE


# ---------------------------------------------------------------------------------- bad inputs


def _corrupt(kind: str, folder: Path, name: str) -> Path:
    """Break one file of a written 2018-style case; return the file that should be named."""
    path = folder / f"{name}_t1.nii.gz"
    seg = folder / f"{name}_seg.nii.gz"
    if kind == "shape":
        write_nii(path, brain_image(20, shape=(8, 9, 11)))
    elif kind == "affine":
        write_nii(path, brain_image(20), np.diag([1.0, 1.0, 1.2, 1.0]))
    elif kind in ("nan", "inf"):
        img = brain_image(20, dtype=np.float32)
        img[4, 4, 4] = np.nan if kind == "nan" else np.inf
        write_nii(path, img)
    elif kind == "truncated":
        write_nii(path, np.random.default_rng(0).integers(0, 30000, SHAPE, dtype=np.int16))
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "not_gzip":
        path.write_bytes(b"this is not a nifti file")
    elif kind in ("label3", "label5"):
        path = seg
        write_nii(seg, label_volume((0, 1, 3 if kind == "label3" else 5)))
    elif kind == "label_nan":
        path = seg
        lab = label_volume().astype(np.float32)
        lab[0, 0, 0] = np.nan
        write_nii(seg, lab)
    elif kind == "label_shape":
        path = seg
        write_nii(seg, label_volume(shape=(8, 9, 9)))
    return path


@pytest.mark.parametrize("kind,match", [
    ("shape", "shape"), ("affine", "affine"), ("nan", "NaN"), ("inf", "inf"),
    ("truncated", "cannot be read"), ("not_gzip", "cannot be read"),
    ("label3", r"label values \[3\]"), ("label5", r"label values \[5\]"),
    ("label_nan", "NaN"), ("label_shape", "shape"),
])
def test_bad_files_raise_naming_the_file(tmp_path, kind, match):
    name = "BraTS2021_00000"
    folder = write_brats(tmp_path, name, label=label_volume())
    bad = _corrupt(kind, folder, name)
    with pytest.raises(ValueError, match=match) as err:
        load_case(find_cases(tmp_path)[0])
    assert bad.name in str(err.value)


def test_msd_wrong_channel_count_raises(tmp_path):
    write_msd(tmp_path, MSD_SHUFFLED, n_train=1, n_labelled=1, n_test=0, channels=3)
    with pytest.raises(ValueError, match="4 channels") as err:
        load_case(find_cases(tmp_path)[0])
    assert "BRATS_000.nii.gz" in str(err.value)


def test_missing_file_after_discovery_raises(tmp_path):
    folder = write_brats(tmp_path, "BraTS2021_00000")
    case = find_cases(tmp_path)[0]
    (folder / "BraTS2021_00000_t2.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="BraTS2021_00000_t2.nii.gz"):
        load_case(case)


# ---------------------------------------------------------------------------------- pipelines


def random_case(shape=(16, 16, 16), seed=0):
    """Raw-intensity brain (non-zero box) with a small nested tumour."""
    rng = np.random.default_rng(seed)
    image = np.zeros((4,) + shape, dtype=np.float32)
    image[:, 2:-2, 2:-2, 2:-2] = rng.uniform(50, 500, (4,) + tuple(s - 4 for s in shape))
    labels = np.zeros(shape, dtype=np.uint8)
    labels[6:10, 6:10, 6:10] = 2
    labels[7:9, 7:9, 7:9] = 1
    labels[8, 8, 8] = 4
    return {"image": image, "label": labels_to_regions(labels, "brats2018"), "name": "x"}


def test_normalize_image_zscores_brain_only():
    d = random_case()
    brain = d["image"][0] != 0
    out = normalize_image(d["image"])
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    for m in range(4):
        assert abs(out[m][brain].mean()) < 1e-4 and abs(out[m][brain].std() - 1) < 1e-3
    assert np.all(out[:, ~brain] == 0)
    t = normalize_image(torch.from_numpy(d["image"]))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), out, atol=1e-5)
    missing = d["image"].copy()
    missing[2] = 0
    assert np.all(normalize_image(missing)[2] == 0)  # a missing modality stays all zero


def test_val_transforms_normalise_deterministically():
    d = random_case()
    brain = d["image"][0] != 0
    first, second = val_transforms()(dict(d)), val_transforms()(dict(d))
    img = first["image"]
    assert isinstance(img, torch.Tensor) and img.dtype == torch.float32 and img.shape == (4, 16, 16, 16)
    assert first["label"].dtype == torch.uint8 and first["label"].shape == (3, 16, 16, 16)
    for m in range(4):
        assert abs(float(img[m][brain].mean())) < 1e-4 and abs(float(img[m][brain].std(unbiased=False)) - 1) < 1e-3
    assert float(img[:, ~brain].abs().max()) == 0.0
    assert torch.equal(img, second["image"])
    assert val_transforms(spatial_dims=2)(dict(d))["image"].shape == (4, 16, 16, 16)
    unlabelled = val_transforms()({"image": d["image"], "label": None})
    assert unlabelled["label"] is None


@pytest.mark.parametrize("spatial_dims,roi", [(3, (8, 8, 8)), (2, (8, 8))])
def test_train_transforms_shapes_and_background(spatial_dims, roi):
    t = train_transforms(roi, spatial_dims=spatial_dims, num_samples=4)
    t.set_random_state(seed=0)
    samples = t(random_case())
    assert len(samples) == 4
    for s in samples:
        assert s["image"].shape == (4, *roi) and s["image"].dtype == torch.float32
        assert s["label"].shape == (3, *roi) and s["label"].dtype == torch.uint8
        assert set(s) == {"image", "label", "name"}
        # augmentation never paints the background: zero in one channel means zero in all
        bg = s["image"][0] == 0
        assert float(s["image"][:, bg].abs().sum()) == 0.0
        assert torch.all(s["label"][0] <= s["label"][1]) and torch.all(s["label"][1] <= s["label"][2])


def test_train_transforms_pads_small_volumes():
    d = random_case(shape=(16, 16, 16))
    d["image"], d["label"] = d["image"][:, :, :, 4:10], d["label"][:, :, :, 4:10]  # only 6 slices deep
    samples = train_transforms((8, 8, 8), num_samples=2)(d)
    assert all(s["image"].shape == (4, 8, 8, 8) for s in samples)


def test_train_crops_foreground_fraction():
    # a 2^3 tumour in a 24^3 brain and 4^3 crops: a crop touches tumour iff it was centred near it
    image = np.zeros((4, 24, 24, 24), dtype=np.float32)
    image[:, 1:-1, 1:-1, 1:-1] = 100 + np.random.default_rng(1).uniform(0, 10, (4, 22, 22, 22))
    labels = np.zeros((24, 24, 24), dtype=np.uint8)
    labels[11:13, 11:13, 11:13] = 2
    d = {"image": image, "label": labels_to_regions(labels, "brats2018")}
    for pos, n, lo, hi in ((0.375, 160, 0.25, 0.5), (0.0, 60, 0.0, 0.05)):
        t = train_transforms((4, 4, 4), num_samples=n, pos_fraction=pos)
        t.set_random_state(seed=3)
        hit = np.mean([float(s["label"][2].any()) for s in t(d)])
        assert lo <= hit <= hi, (pos, hit)


def test_load_cased_feeds_the_pipelines(tmp_path):
    write_brats(tmp_path, "Brats18_A_1", label=label_volume())
    case = find_cases(tmp_path)[0]
    d = LoadCased()({"case": case, "fold": 3})
    assert d["fold"] == 3 and d["name"] == "Brats18_A_1" and d["image"].shape == (4,) + SHAPE
    samples = Compose([LoadCased(), train_transforms((4, 4, 4), num_samples=2)])({"case": case})
    assert [s["image"].shape for s in samples] == [(4, 4, 4, 4)] * 2
    v = Compose([LoadCased(), val_transforms()])({"case": case})
    assert v["case"] is case and v["image"].shape == (4,) + SHAPE
    with pytest.raises(ValueError, match="expects a Case"):
        LoadCased()({"case": str(tmp_path)})


def test_case_dataclass():
    c = Case("x", "brats2018", "brats2018", {m: Path(f"/d/x_{m}.nii") for m in MODALITIES})
    assert not c.labelled and c.folder == Path("/d")


# ---------------------------------------------------------------------------------- file sizes and scaling


def test_a_header_larger_than_the_file_is_refused_before_reading(tmp_path):
    import gzip

    folder = write_brats(tmp_path, "BraTS2021_00000", label=label_volume())
    flair = folder / "BraTS2021_00000_flair.nii.gz"
    img = nib.load(str(flair))
    hdr = img.header.copy()
    hdr.set_data_shape((1500, 1500, 1500))  # 6.75 GB of int16 claimed by a file of a few hundred bytes
    flair.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * 1000))
    with pytest.raises(ValueError, match=r"cannot be read: its header describes 1500x1500x1500 int16 voxels"):
        load_case(find_cases(tmp_path)[0])


def test_gzip_files_of_several_members_are_read(tmp_path):
    """The gzip trailer only gives the last member's size: a file of several members (bgzip,
    concatenated streams) is counted, not refused."""
    import gzip

    folder = write_brats(tmp_path, "BraTS2021_00000", label=label_volume())
    t1 = folder / "BraTS2021_00000_t1.nii.gz"
    raw = gzip.decompress(t1.read_bytes())
    t1.write_bytes(gzip.compress(raw[:700]) + gzip.compress(raw[700:]))
    assert int.from_bytes(t1.read_bytes()[-4:], "little") < len(raw)
    assert load_case(find_cases(tmp_path)[0])["image"][1, 4, 4, 4] == 20


def test_label_scaling_is_applied_and_checked(tmp_path):
    folder = write_brats(tmp_path, "BraTS2021_00000")
    img = nib.Nifti1Image(label_volume((0, 2, 4, 8)), np.eye(4))  # stored x2, slope 0.5: the labels 0, 1, 2, 4
    img.header.set_slope_inter(0.5, 0.0)
    nib.save(img, str(folder / "BraTS2021_00000_seg.nii.gz"))
    d = load_case(find_cases(tmp_path)[0])
    assert d["label"][:, 3, 3, 5].tolist() == [1, 1, 1]  # 8 * 0.5 = 4: ET
    img = nib.Nifti1Image(label_volume((0, 1, 2, 4)), np.eye(4))  # slope 0.5 turns ET 4 into 2, NCR 1 into 0.5
    img.header.set_slope_inter(0.5, 0.0)
    nib.save(img, str(folder / "BraTS2021_00000_seg.nii.gz"))
    with pytest.raises(ValueError, match=r"whole numbers.*e\.g\. 0\.5.*slope 0\.5"):
        load_case(find_cases(tmp_path)[0])


def test_files_of_one_case_stored_in_other_axis_orders_are_one_grid(tmp_path):
    write_brats(tmp_path / "ras", "Brats18_A_1", label=label_volume())
    folder = write_brats(tmp_path / "mixed", "Brats18_A_1", label=label_volume())
    # the T1ce stored LPS (x and y reversed, origin moved to match): the same voxels in space
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:2, 3] = (SHAPE[0] - 1, SHAPE[1] - 1)
    write_nii(folder / "Brats18_A_1_t1ce.nii.gz", brain_image(30)[::-1, ::-1], lps)
    a, b = load_case(find_cases(tmp_path / "ras")[0]), load_case(find_cases(tmp_path / "mixed")[0])
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["affine"], b["affine"])
