"""Tests of the phantom generator (lckd_kit.phantom).

Small grids keep this file fast: 32^3 (6 mm) for structure, I/O and determinism, a few 96^3
cases for the volumes in cm^3, and 24 cases at 64^3 (3 mm) for the single-modality ranking probe.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from scipy import ndimage

from lckd_kit import MODALITIES, REGIONS, phantom

REGION_LABELS = {"ET": (4,), "TC": (1, 4), "WT": (1, 2, 4)}


def regions_of(label: np.ndarray) -> dict[str, np.ndarray]:
    return {r: np.isin(label, v) for r, v in REGION_LABELS.items()}


@pytest.fixture(scope="module")
def small_cases():
    """Six 32^3 cases; seed 3 is low-grade-like (no ET)."""
    return {s: phantom.make_case(s, grid=32) for s in (0, 1, 2, 3, 4, 5)}


# ------------------------------------------------------------------------------- the prior
def test_prior_geometry_and_tissue_fractions():
    prior = phantom.load_prior()
    assert prior.probs.shape == (3, 96, 96, 96) and prior.probs.dtype == np.float32
    np.testing.assert_allclose(prior.spacing, [2.0, 2.0, 2.0])
    assert prior.affine[0, 0] > 0 and prior.affine[1, 1] > 0 and prior.affine[2, 2] > 0  # RAS
    brain = prior.brain
    # ICBM152 skull-stripped brain incl. CSF is 1887 cm^3 at 1 mm
    assert 1800 < brain.sum() * 8 / 1000 < 1980
    # the brain is centred in the box and fits with a margin
    idx = np.argwhere(brain)
    assert idx.min() >= 2 and idx.max() <= 93
    assert np.all(np.abs((idx.min(0) + idx.max(0)) / 2 - 47.5) < 2)
    # mean GM+WM inside the brain ~0.88 (B0) and CSF makes up the rest
    gm, wm, csf = prior.probs[:, brain]
    assert 0.8 < float((gm + wm).mean()) < 0.95
    assert 0.03 < float((csf > 0.5).mean()) < 0.15
    assert not prior.probs.flags.writeable  # cached and shared


def test_prior_downsampled_keeps_field_of_view():
    coarse = phantom.load_prior(32)
    assert coarse.probs.shape == (3, 32, 32, 32)
    np.testing.assert_allclose(coarse.spacing, [6.0, 6.0, 6.0])
    # the outer faces of the box are the same as the 96^3 grid's
    full = phantom.load_prior()
    np.testing.assert_allclose(coarse.affine[:3, 3] - 3.0, full.affine[:3, 3] - 1.0)
    vol_full = full.brain.sum() * 8.0
    vol_coarse = coarse.brain.sum() * 216.0
    assert abs(vol_coarse / vol_full - 1) < 0.1


def test_missing_prior_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LCKD_KIT_DATA_SAMPLES", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tools/make_prior.py"):
        phantom.load_prior(32)


# ------------------------------------------------------------------------------- structure
def test_case_arrays_and_nesting(small_cases):
    for seed, case in small_cases.items():
        image, label, brain = case["image"], case["label"], case["brain"]
        assert image.shape == (4, 32, 32, 32) and image.dtype == np.int16
        assert label.shape == (32, 32, 32) and label.dtype == np.uint8
        assert set(np.unique(label)) <= {0, 1, 2, 4}
        # background exactly 0 in every modality; every brain voxel non-zero (non-zero == brain)
        assert np.all(image[:, ~brain] == 0)
        assert np.all(image[:, brain] > 0)
        assert 200 < np.median(image[:, brain]) < 1000  # BraTS-like integer scale
        reg = regions_of(label)
        assert not np.any(label[~brain])  # tumour inside the brain
        assert np.all(reg["TC"] <= reg["WT"]) and np.all(reg["ET"] <= reg["TC"])
        # one connected tumour core and one whole tumour (26-connectivity)
        for r in ("TC", "WT"):
            assert ndimage.label(reg[r], structure=np.ones((3, 3, 3)))[1] == 1, (seed, r)
        assert reg["ET"].any() == case["has_et"]
        assert case["has_et"] != case["lgg_like"]
        vox_cm3 = 6.0**3 / 1000
        for r in REGIONS:
            assert case["volumes"][r] == pytest.approx(reg[r].sum() * vox_cm3)


def test_low_grade_like_case_has_core_but_no_enhancement(small_cases):
    case = small_cases[3]
    assert case["lgg_like"] and not case["has_et"]
    assert case["volumes"]["ET"] == 0 and case["volumes"]["TC"] > 2


@pytest.fixture(scope="module")
def cases96():
    """Three full-size cases (96^3 at 2 mm), all with ET -- about a second each."""
    return [phantom.make_case(phantom.case_seed(7, i)) for i in range(3)]


def test_volumes_in_measured_ranges_at_96(cases96):
    # measured on the first prototype (24 cases): WT 41-153, TC 3-43, ET 2-22 cm^3; real
    # BraTS: oedema up to ~216, WT median ~80. The generator's 24-case spread at seed 7 is
    # WT 27-166, TC 7-48, ET 5-23; the bounds below leave room around both.
    for case in cases96:
        v = case["volumes"]
        assert case["image"].shape == (4, 96, 96, 96)
        assert case["has_et"]
        assert 20 < v["WT"] < 250, v
        assert 3 < v["TC"] < 60, v
        assert 1.5 < v["ET"] < 35, v
        assert v["ET"] < v["TC"] < v["WT"]
    assert 40 < np.median([c["volumes"]["WT"] for c in cases96]) < 150


def test_no_et_fraction_decision():
    seeds = range(2000)
    frac = np.mean([phantom.is_lgg_like(s) for s in seeds])
    assert 0.12 < frac < 0.18  # default 0.15
    assert not any(phantom.is_lgg_like(s, 0.0) for s in range(100))
    assert all(phantom.is_lgg_like(s, 1.0) for s in range(100))
    assert 0.4 < np.mean([phantom.is_lgg_like(s, 0.5) for s in seeds]) < 0.6
    # the cheap decision is exactly what make_case does
    for seed in (3, 11, 12):
        assert phantom.make_case(seed, grid=32)["lgg_like"] == phantom.is_lgg_like(seed)


def test_no_et_fraction_extremes_in_generated_cases():
    for seed in range(4):
        assert phantom.make_case(seed, grid=32, no_et_fraction=0.0)["has_et"]
        case = phantom.make_case(seed, grid=32, no_et_fraction=1.0)
        assert not case["has_et"] and case["volumes"]["TC"] > 0


def test_modality_contrasts_follow_mri_facts(cases96):
    """Median intensity per tissue keeps the qualitative MRI facts (docs/phantoms.md)."""
    gm, wm, csf = phantom.load_prior().probs
    for case in cases96:
        healthy = case["brain"] & (case["label"] == 0)
        med = {}
        for m, mod in enumerate(MODALITIES):
            img = case["image"][m].astype(float)
            med[mod] = {k: np.median(img[mask]) for k, mask in (
                ("wm", healthy & (wm > 0.8)), ("gm", healthy & (gm > 0.7)), ("csf", healthy & (csf > 0.7)),
                ("ed", case["label"] == 2), ("et", case["label"] == 4), ("core", case["label"] == 1))}
        assert med["t1"]["wm"] > 1.15 * med["t1"]["gm"] > 1.15 * med["t1"]["csf"]  # T1: WM > GM > CSF
        assert med["t2"]["csf"] > med["t2"]["gm"] > med["t2"]["wm"]  # T2: CSF brightest, GM > WM
        assert med["t2"]["ed"] > 1.8 * med["t2"]["wm"]  # T2: oedema bright
        assert med["flair"]["csf"] < 0.6 * med["flair"]["wm"]  # FLAIR: free water nulled
        assert med["flair"]["ed"] > 1.5 * med["flair"]["wm"]  # FLAIR: oedema bright, the brightest tissue
        assert med["flair"]["ed"] > med["flair"]["core"] > med["flair"]["wm"]  # necrosis not nulled
        assert med["flair"]["gm"] > med["flair"]["wm"]
        assert med["t1ce"]["et"] > 1.1 * med["t1ce"]["wm"]  # enhancing rim bright after contrast
        assert med["t1ce"]["et"] > 2.0 * med["t1ce"]["ed"]
        assert med["t1ce"]["core"] < 0.75 * med["t1ce"]["et"]  # necrotic centre dark
        # oedema and core hypo-intense on T1 and T1ce: oedema below grey matter, core below oedema
        for mod in ("t1", "t1ce"):
            assert med[mod]["ed"] < 0.92 * med[mod]["gm"] and med[mod]["core"] < 0.85 * med[mod]["ed"], mod


# ------------------------------------------------------------------------------- the cues knob
def _tissue_medians(case: dict, grid: int) -> dict[str, np.ndarray]:
    """Median intensity per tissue and modality, divided by the white-matter median: name -> (4,)."""
    gm, wm, csf = phantom.load_prior(grid).probs
    lab, img = case["label"], case["image"].astype(float)
    healthy = case["brain"] & (lab == 0)
    masks = dict(gm=healthy & (gm > 0.7), csf=healthy & (csf > 0.7), ed=lab == 2, core=lab == 1, et=lab == 4)
    ref = np.array([np.median(img[m][healthy & (wm > 0.7)]) for m in range(4)])
    return {k: np.array([np.median(img[m][mask]) for m in range(4)]) / ref for k, mask in masks.items() if mask.any()}


def test_cues_zero_is_generator_version_2():
    """cues=0 gives version 2's tables and, for the same seed, version 2's image contrasts."""
    table = phantom.signal_table(0.0)
    for name, row in phantom.SIGNAL_V2.items():
        np.testing.assert_array_equal(table[name], row)
    np.testing.assert_array_equal(phantom.ed_border(0.0), phantom.ED_BORDER_V2)
    for name, row in phantom.SIGNAL.items():
        np.testing.assert_array_equal(phantom.signal_table(1.0)[name], row)
    # tissue / white-matter medians (FLAIR, T1, T1ce, T2) of make_case(1, grid=48) measured with
    # generator version 2 before the knob existed
    v2 = dict(ed=[1.4668, 0.7772, 0.7731, 1.6600], core=[0.8870, 0.5016, 0.5254, 2.4900],
              et=[1.2932, 0.7021, 1.1090, 1.8675])
    med = _tissue_medians(phantom.make_case(1, grid=48, cues=0.0), 48)
    for k, ref in v2.items():
        np.testing.assert_allclose(med[k], ref, rtol=5e-3, err_msg=k)


@pytest.fixture(scope="module")
def cue_ladder():
    """make_case(1, grid=48) at cues 0, 0.5, 1, 2: tissue medians / WM (and the labels)."""
    cases = {c: phantom.make_case(1, grid=48, cues=c) for c in (0.0, 0.5, 1.0, 2.0)}
    return {c: (_tissue_medians(case, 48), case["label"]) for c, case in cases.items()}


def test_cues_grow_the_cross_modal_contrasts(cue_ladder):
    fl, t1, t1ce, t2 = range(4)
    med = {c: m for c, (m, _) in cue_ladder.items()}
    cs = sorted(med)

    def increasing(f):
        values = [f(med[c]) for c in cs]
        assert all(b > a for a, b in zip(values, values[1:])), values
        return values

    # oedema darker than white matter on T1 and T1ce, and darker than grey matter as cues grow
    v = increasing(lambda m: 1 - m["ed"][t1])
    assert v[0] < 0.3 and v[2] > 0.35
    increasing(lambda m: 1 - m["ed"][t1ce])
    increasing(lambda m: m["gm"][t1] - m["ed"][t1])
    # necrotic core: darker on T1, brighter on FLAIR (not nulled like CSF)
    increasing(lambda m: 1 - m["core"][t1])
    increasing(lambda m: m["core"][fl])
    # oedema brighter on T2 (relative to white matter): a sharper, fuller margin
    increasing(lambda m: m["ed"][t2])
    # what stays: the rim enhances on T1ce (at 4 mm partial volume with the core dims it), oedema
    # is bright on FLAIR
    for m in med.values():
        assert m["et"][t1ce] > 1.3 * m["ed"][t1ce]
        assert m["ed"][fl] > 1.3
    # the labels do not depend on cues
    labels = [lab for _, lab in cue_ladder.values()]
    assert all(np.array_equal(labels[0], lab) for lab in labels[1:])


def test_cues_extrapolate_within_range():
    for cues in (0.0, 0.3, 1.0, 2.0, 5.0, 100.0):
        table = phantom.signal_table(cues)
        values = np.stack(list(table.values()))
        assert values.min() >= 0.02 and values.max() <= 1.0
        border = phantom.ed_border(cues)
        assert np.all((border >= 0.05) & (border <= 1.0))
    # between 0 and 1 the table interpolates linearly
    half = phantom.signal_table(0.5)["ed"]
    np.testing.assert_allclose(half, (np.array(phantom.SIGNAL_V2["ed"]) + phantom.SIGNAL["ed"]) / 2)
    case = phantom.make_case(2, grid=32, cues=7.5)
    assert np.all(case["image"][:, case["brain"]] > 0) and case["params"]["cues"] == 7.5
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cues"):
            phantom.make_case(0, grid=32, cues=bad)


def test_cues_deterministic_and_distinct():
    a = phantom.make_case(4, grid=32, cues=1.3)
    b = phantom.make_case(4, grid=32, cues=1.3)
    c = phantom.make_case(4, grid=32, cues=1.0)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])
    np.testing.assert_array_equal(a["label"], c["label"])
    assert phantom.make_case(4, grid=32)["params"]["cues"] == 1.0  # the default


# ------------------------------------------------------------------------------- BraTS space
@pytest.fixture(scope="module")
def brats_case():
    return phantom.make_case(3, geometry="brats")


def test_brats_geometry_case(brats_case, tmp_path):
    """240 x 240 x 155 voxels of 1 mm, LPS (SRI24 space), the brain where a BraTS brain sits."""
    import nibabel as nib

    case = brats_case
    assert case["image"].shape == (4, 240, 240, 155) and case["image"].dtype == np.int16
    assert case["label"].shape == (240, 240, 155) and case["label"].dtype == np.uint8
    expected = np.array([[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    np.testing.assert_array_equal(case["affine"], expected)
    assert nib.aff2axcodes(case["affine"]) == ("L", "P", "S")
    np.testing.assert_array_equal(case["spacing"], [1.0, 1.0, 1.0])
    assert case["params"]["geometry"] == "brats" and case["params"]["grid"] == [240, 240, 155]
    brain, label = case["brain"], case["label"]
    assert np.all(case["image"][:, ~brain] == 0) and np.all(case["image"][:, brain] > 0)
    # a BraTS-sized brain (about 1.2-1.5 litres incl. CSF), inside the volume with a margin, centred
    # where BraTS brains are (bounding box of a real case: voxels 54-182, 51-212, 9-139)
    assert 1200 < brain.sum() / 1000 < 1550
    idx = np.argwhere(brain)
    lo, hi = idx.min(0), idx.max(0)
    assert np.all(lo >= 2) and np.all(hi <= np.array([237, 237, 152]))
    np.testing.assert_allclose((lo + hi) / 2, phantom.BRATS_BRAIN_CENTRE_VOX, atol=4)
    np.testing.assert_allclose(hi - lo + 1, [131, 162, 140], atol=6)
    # orientation: the brain's centre of mass lies posterior of its box centre (cerebellum,
    # occipital lobes) -- in LPS voxels that is a larger j; the tumour sits where params say (mm)
    assert idx[:, 1].mean() > (lo[1] + hi[1]) / 2 + 2
    tumour_mm = case["affine"][:3, :3] @ np.argwhere(np.isin(label, (1, 4))).mean(0) + case["affine"][:3, 3]
    np.testing.assert_allclose(tumour_mm, case["params"]["centre_mm"], atol=8)
    # labels: BraTS 2018 values, nested, inside the brain, sizes in mm (1 mm^3 voxels)
    assert set(np.unique(label)) <= {0, 1, 2, 4} and not np.any(label[~brain])
    reg = regions_of(label)
    assert np.all(reg["ET"] <= reg["TC"]) and np.all(reg["TC"] <= reg["WT"])
    for r in REGIONS:
        assert case["volumes"][r] == pytest.approx(reg[r].sum() / 1000.0)
    assert 20 < case["volumes"]["WT"] < 250 and case["volumes"]["TC"] > 3
    # written with the LPS affine, read back unchanged
    folder = phantom.write_case(case, tmp_path, "BraTS_like")
    img = nib.load(str(folder / "BraTS_like_t1ce.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S") and img.shape == (240, 240, 155)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), case["image"][2])
    with pytest.raises(ValueError, match="grid"):
        phantom.make_case(0, grid=32, geometry="brats")
    with pytest.raises(ValueError, match="geometry"):
        phantom.make_case(0, geometry="talairach")


def test_brats_geometry_matches_the_mni_case_in_mm(brats_case):
    """The same seed draws the same tumour parameters (mm) on both geometries."""
    mni = phantom.make_case(3)
    for k in ("R_tc", "R_ncr", "R_wt", "n_vessels", "n_plexus"):
        assert brats_case["params"][k] == mni["params"][k]
    assert brats_case["lgg_like"] == mni["lgg_like"]


def test_difficulty_knobs():
    easy = phantom.make_case(5, grid=32, difficulty="easy")
    hard = phantom.make_case(5, grid=32, difficulty="hard")
    assert easy["params"]["n_vessels"] == 0 and easy["params"]["n_plexus"] == 0
    assert hard["params"]["n_vessels"] >= 6 and hard["params"]["n_plexus"] >= 2
    np.testing.assert_array_equal(easy["label"], hard["label"])  # same anatomy and tumour
    with pytest.raises(ValueError):
        phantom.make_case(0, grid=32, difficulty="impossible")


def test_mass_effect_displacement():
    """probs'(x) = probs(x - u(x)) with |u| = 0.3 R_tc exp(-d^2 / 2 R_wt^2) pointing away from c."""
    prior = phantom.load_prior(32)
    affine = np.array(prior.affine)
    brain = np.zeros((32, 32, 32), bool)
    brain[4:28, 4:28, 4:28] = True
    x_mm = affine[0, 3] + 6.0 * np.arange(32, dtype=np.float32)
    ramp = np.broadcast_to(x_mm[:, None, None], (32, 32, 32)).astype(np.float32)
    probs = np.stack([ramp, ramp, ramp])
    centre = nib_apply(affine, (16, 16, 16))
    out = phantom._mass_effect(probs, affine, brain, centre, r_tc=20.0, r_wt=30.0)
    d = 4 * 6.0  # voxel (20, 16, 16): 24 mm from the centre along +x
    expected_shift = 0.3 * 20.0 * np.exp(-(d**2) / (2 * 30.0**2))
    assert out[0, 20, 16, 16] == pytest.approx(ramp[20, 16, 16] - expected_shift, abs=1e-3)
    assert out[0, 0, 0, 0] == 0  # outside the brain stays empty


def nib_apply(affine, vox):
    return (affine[:3, :3] @ np.asarray(vox, float) + affine[:3, 3]).astype(np.float32)


def test_smooth_noise_statistics():
    rng = np.random.default_rng(0)
    for sigma in (1.5, 4.0, 20.0):  # full-resolution and coarse-grid paths
        field = phantom.smooth_noise(rng, (40, 48, 56), sigma)
        assert field.shape == (40, 48, 56) and field.dtype == np.float32
        assert abs(field.mean()) < 0.15 and abs(field.std() - 1) < 0.15
        corr = np.corrcoef(field[:-1].ravel(), field[1:].ravel())[0, 1]
        # neighbour correlation of Gaussian-smoothed noise: exp(-1 / (4 sigma^2))
        assert corr == pytest.approx(np.exp(-1 / (4 * sigma**2)), abs=0.06)


# ------------------------------------------------------------------------------- determinism and I/O
def test_same_seed_same_bytes(tmp_path):
    before = np.random.get_state()[1].copy()
    a = phantom.write_case(phantom.make_case(11, grid=32), tmp_path / "a", "P")
    b = phantom.write_case(phantom.make_case(11, grid=32), tmp_path / "b", "P")
    c = phantom.write_case(phantom.make_case(12, grid=32), tmp_path / "c", "P")
    np.testing.assert_array_equal(np.random.get_state()[1], before)  # global RNG untouched
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(f"P_{s}.nii.gz" for s in ("flair", "t1", "t1ce", "t2", "seg"))
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
        assert (a / n).read_bytes() != (c / n).read_bytes(), n


def test_written_files_read_back(tmp_path):
    import nibabel as nib

    case = phantom.make_case(2, grid=32)
    folder = phantom.write_case(case, tmp_path, "PhantomBraTS_x")
    for m, mod in enumerate(MODALITIES):
        img = nib.load(str(folder / f"PhantomBraTS_x_{mod}.nii.gz"))
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert img.get_data_dtype() == np.int16
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), case["image"][m])
        np.testing.assert_allclose(img.affine, case["affine"])
    seg = nib.load(str(folder / "PhantomBraTS_x_seg.nii.gz"))
    assert seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(seg.dataobj), case["label"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_brats2023_layout_and_labels(tmp_path):
    import nibabel as nib

    case18 = phantom.make_case(0, grid=32)
    case23 = phantom.make_case(0, grid=32, label_style="brats2023")
    assert set(np.unique(case23["label"])) == {0, 1, 2, 3}
    np.testing.assert_array_equal(case23["label"] == 3, case18["label"] == 4)
    folder = phantom.write_case(case23, tmp_path / "n", "BraTS-GLI-00000-000")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"BraTS-GLI-00000-000-{s}.nii.gz" for s in ("t2f", "t1n", "t1c", "t2w", "seg"))
    # a brats2018 case written in 2023 style gets its ET label converted 4 -> 3
    folder = phantom.write_case(case18, tmp_path / "c", "C", label_style="brats2023")
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(folder / "C-seg.nii.gz")).dataobj), case23["label"])
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(folder / "C-t2f.nii.gz")).dataobj), case18["image"][0])


def test_generate_manifest_skip_and_regenerate(tmp_path):
    out = tmp_path / "set"
    paths = phantom.generate(out, 3, seed=4, grid=32, progress=False)
    assert [p.name for p in paths] == ["PhantomBraTS_000", "PhantomBraTS_001", "PhantomBraTS_002"]
    manifest = json.loads((out / phantom.MANIFEST).read_text())
    assert manifest["params"]["seed"] == 4 and manifest["params"]["grid"] == [32, 32, 32]
    assert manifest["cases"]["PhantomBraTS_001"]["seed"] == phantom.case_seed(4, 1)
    # per-case seeds are what make_case would use: same bytes as a direct write
    direct = phantom.write_case(phantom.make_case(phantom.case_seed(4, 1), grid=32), tmp_path / "d", "PhantomBraTS_001")
    f = "PhantomBraTS_001_t1ce.nii.gz"
    assert (direct / f).read_bytes() == (out / "PhantomBraTS_001" / f).read_bytes()

    stamp = {p: os.stat(p / f"{p.name}_flair.nii.gz").st_mtime_ns for p in paths}
    phantom.generate(out, 3, seed=4, grid=32, progress=False)  # identical parameters: skipped
    assert all(os.stat(p / f"{p.name}_flair.nii.gz").st_mtime_ns == t for p, t in stamp.items())

    t1ce_before = (out / "PhantomBraTS_000" / "PhantomBraTS_000_t1ce.nii.gz").read_bytes()
    phantom.generate(out, 2, seed=4, grid=32, difficulty="hard", progress=False)  # changed: redone
    assert (out / "PhantomBraTS_000" / "PhantomBraTS_000_t1ce.nii.gz").read_bytes() != t1ce_before
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["PhantomBraTS_000", "PhantomBraTS_001"]


def test_generate_and_cache_keyed_by_cues(tmp_path):
    out = tmp_path / "set"
    phantom.generate(out, 2, seed=4, grid=32, progress=False)
    manifest = json.loads((out / phantom.MANIFEST).read_text())
    assert manifest["params"]["cues"] == 1.0
    f = out / "PhantomBraTS_000" / "PhantomBraTS_000_t1.nii.gz"
    before = f.read_bytes()
    phantom.generate(out, 2, seed=4, grid=32, progress=False, cues=0.5)  # another cues value: redone
    assert json.loads((out / phantom.MANIFEST).read_text())["params"]["cues"] == 0.5
    assert f.read_bytes() != before
    direct = phantom.write_case(phantom.make_case(phantom.case_seed(4, 0), grid=32, cues=0.5), tmp_path / "d",
                                "PhantomBraTS_000")
    assert (direct / f.name).read_bytes() == f.read_bytes()
    # the cache folder name carries the cues value: different values never share a folder
    roots = {c: phantom.ensure_phantoms(1, seed=1, grid=32, cache_dir=tmp_path / "cache", progress=False, cues=c)
             for c in (0.0, 1.0, 2.5)}
    assert len(set(roots.values())) == 3
    assert "_c0_" in roots[0.0].name and "_c1_" in roots[1.0].name and "_c2.5_" in roots[2.5].name
    assert f"_v{phantom.GENERATOR_VERSION}_" in roots[1.0].name
    assert phantom.cues_tag(1) == phantom.cues_tag(1.0) == "c1"


def test_ensure_phantoms_uses_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCKD_KIT_CACHE", str(tmp_path / "cache"))
    assert phantom.default_cache_dir() == tmp_path / "cache"
    root = phantom.ensure_phantoms(2, seed=1, grid=32, progress=False)
    assert root.parent == tmp_path / "cache"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["PhantomBraTS_000", "PhantomBraTS_001"]
    assert phantom.ensure_phantoms(2, seed=1, grid=32, progress=False) == root


def test_bundled_demo_cases():
    root = phantom.data_samples_dir()
    demos = sorted(p for p in root.glob("PhantomBraTS_demo_*") if p.is_dir())
    assert [p.name for p in demos] == ["PhantomBraTS_demo_000", "PhantomBraTS_demo_001"]
    assert (root / "NOTICE").read_text().count("McGill University") >= 2
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert total < 4.5e6  # the committed sample data stays small


def test_generated_cases_load_through_data_module(tmp_path):
    from lckd_kit import data
    phantom.generate(tmp_path, 2, seed=3, grid=32, progress=False)
    cases = data.find_cases(tmp_path)
    assert [c.name for c in cases] == ["PhantomBraTS_000", "PhantomBraTS_001"]
    for i, c in enumerate(cases):
        loaded = data.load_case(c)
        made = phantom.make_case(phantom.case_seed(3, i), grid=32)
        assert loaded["image"].shape == (4, 32, 32, 32) and loaded["image"].dtype == np.float32
        np.testing.assert_array_equal(loaded["image"], made["image"].astype(np.float32))
        assert loaded["label"].shape == (3, 32, 32, 32) and loaded["label"].dtype == np.uint8
        reg = regions_of(made["label"])
        for r, name in enumerate(REGIONS):
            np.testing.assert_array_equal(loaded["label"][r].astype(bool), reg[name])


# ------------------------------------------------------------------------------- the ranking probe
def _probe_features(img: np.ndarray, brain: np.ndarray, mask_blurs: list[np.ndarray]) -> np.ndarray:
    """Voxel-wise features of one modality -> (n_brain, 21) float32.

    z-scored intensity, its masked Gaussian blurs (sigma 1, 2 voxels; ``mask_blurs`` are the brain
    mask blurred the same way, shared by the four modalities), the local max and min of the
    sigma-1 blur over 5^3 voxels ("is there enhancement / a dark core nearby" -- a CNN's receptive
    field in miniature), and all pairwise products (a quadratic probe).
    """
    v = img.astype(np.float32)
    inside = v[brain]
    z = (v - inside.mean()) / (inside.std() + 1e-6) * brain
    blurs = [ndimage.gaussian_filter(z, s) / mb for s, mb in zip((1.0, 2.0), mask_blurs)]
    local_max = ndimage.maximum_filter(np.where(brain, blurs[0], -1e3), size=5)
    local_min = ndimage.minimum_filter(np.where(brain, blurs[0], 1e3), size=5)
    f = np.stack([z[brain]] + [b[brain] for b in blurs] + [local_max[brain], local_min[brain]], 1)
    quad = [f[:, i] * f[:, j] for i in range(f.shape[1]) for j in range(i, f.shape[1])]
    return np.concatenate([np.ones((len(f), 1), np.float32), f, np.stack(quad, 1)], 1)


def _fit_logistic(x: np.ndarray, y: np.ndarray, iters: int = 7, l2: float = 1e-2) -> np.ndarray:
    """Logistic regression weights by Newton steps (IRLS): x (n, k), y (n,) in {0, 1} -> (k,)."""
    w = np.zeros(x.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(x @ w, -30, 30)))
        hess = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(len(w))
        w -= np.linalg.solve(hess, x.T @ (p - y) + l2 * w)
    return w


def _dice_curve(scores: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Dice of (scores > t) vs truth for every threshold t -> (n_thresholds,); both empty -> 1."""
    order = np.argsort(scores)
    s, t = scores[order], truth[order]
    hits_at_or_above = np.concatenate([np.cumsum(t[::-1])[::-1], [0]])  # true voxels from index i on
    first = np.searchsorted(s, thresholds, side="right")  # first index with score > threshold
    n_pred = len(s) - first
    inter = hits_at_or_above[first]
    total = n_pred + t.sum()
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def probe_dice_table(cases: list[dict], n_train: int) -> dict[tuple[str, str], float]:
    """Single-modality probe: per modality and region, fit on cases[:n_train], tune the threshold for
    mean train Dice, report mean Dice on cases[n_train:]."""
    rng = np.random.default_rng(0)
    thresholds = np.linspace(-4, 4, 41)
    table = {}
    mask_blurs = [[np.maximum(ndimage.gaussian_filter(c["brain"].astype(np.float32), s), 1e-3) for s in (1.0, 2.0)]
                  for c in cases]
    truths = {r: [np.isin(c["label"][c["brain"]], REGION_LABELS[r]) for c in cases] for r in REGIONS}
    n_fit = sum(int(c["brain"].sum()) for c in cases[:n_train])
    pick = np.sort(rng.choice(n_fit, 20000, replace=False))  # the voxels the probe is fitted on
    for m, mod in enumerate(MODALITIES):
        feats = [_probe_features(c["image"][m], c["brain"], mb) for c, mb in zip(cases, mask_blurs)]
        x = np.concatenate(feats[:n_train])[pick].astype(np.float64)
        weights = np.stack([_fit_logistic(x, np.concatenate(truths[r][:n_train])[pick].astype(np.float64))
                            for r in REGIONS], 1).astype(np.float32)
        scores = [f @ weights for f in feats]  # (n_brain, 3) per case
        for k, region in enumerate(REGIONS):
            pairs = [(s[:, k], t) for s, t in zip(scores, truths[region])]
            train = np.mean([_dice_curve(s, t, thresholds) for s, t in pairs[:n_train]], 0)
            best = thresholds[[int(np.argmax(train))]]
            table[mod, region] = float(np.mean([_dice_curve(s, t, best)[0] for s, t in pairs[n_train:]]))
    return table


def test_dice_curve_matches_direct_count():
    rng = np.random.default_rng(1)
    scores, truth = rng.normal(size=500), rng.random(500) < 0.3
    ths = np.array([-9.0, -0.5, 0.0, 0.7, 9.0])
    direct = [2 * ((scores > t) & truth).sum() / ((scores > t).sum() + truth.sum()) for t in ths]
    np.testing.assert_allclose(_dice_curve(scores, truth, ths), direct)
    assert _dice_curve(scores, np.zeros(500, bool), np.array([9.0]))[0] == 1.0  # both empty


@pytest.mark.slow
def test_single_modality_ranking():
    """T1ce is the best single modality for ET and TC, FLAIR for WT (as on real scans), and every
    other modality still reveals part of each region (the cues).

    32 cases at 64^3 (3 mm): the probe is trained on 16 and scored on the other 16.
    """
    cases = [phantom.make_case(phantom.case_seed(100, i), grid=64) for i in range(32)]
    dice = probe_dice_table(cases, n_train=16)
    table = "\n".join(f"{mod:>6} " + " ".join(f"{dice[mod, r]:.2f}" for r in REGIONS) for mod in MODALITIES)
    # the calibrated T1 shows the dark core nearly as well as T1ce does (docs/phantoms.md): a smaller
    # margin for TC; the shipped model, trained on these phantoms, still elects T1ce for it
    for region, best, margin in (("ET", "t1ce", 0.15), ("TC", "t1ce", 0.03), ("WT", "flair", 0.05)):
        for mod in MODALITIES:
            if mod != best:
                assert dice[best, region] > dice[mod, region] + margin, f"{region}: {best} vs {mod}\n{table}"
    assert dice["t1ce", "ET"] > 0.5 and dice["t1ce", "TC"] > 0.6 and dice["flair", "WT"] > 0.7, table
    for mod in ("flair", "t1", "t2"):
        assert dice[mod, "ET"] > 0.2 and dice[mod, "TC"] > 0.4 and dice[mod, "WT"] > 0.5, table
