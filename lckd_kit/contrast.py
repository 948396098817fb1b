"""What each tissue looks like in each modality: the phantom's MRI signal model.

A relative signal (0-1) per tissue and modality, the oedema's fade at the tumour border, sulcal
effacement, the label slack of human raters and the difficulty knobs (noise, texture, bias field,
confounders). ``cues`` moves the tumour rows between the previous generator's table (0: only T1ce
shows the enhancing rim, only FLAIR/T2 the oedema) and the calibrated one (1, the default); the
MRI facts behind each row and the calibration are in ``docs/phantoms.md``. The recipe that paints
these signals onto a tumour is :mod:`lckd_kit.phantom`.
"""
from __future__ import annotations

import numpy as np

#: Relative signal (0-1) per tissue of generator version 2, columns in MODALITIES order (flair, t1,
#: t1ce, t2): the contrasts at ``cues=0``. Only T1ce showed the enhancing rim and only FLAIR/T2
#: showed the oedema clearly; in T1 and T1ce oedema and non-enhancing tumour had the grey-matter
#: signal, so a model learnt little from the other modalities.
SIGNAL_V2: dict[str, tuple[float, float, float, float]] = {
    #              flair  t1    t1ce  t2
    "wm":         (0.55, 0.90, 0.62, 0.30),
    "gm":         (0.65, 0.65, 0.48, 0.42),
    "csf":        (0.05, 0.25, 0.20, 0.95),
    "ed":         (0.95, 0.60, 0.45, 0.72),
    "ncr":        (0.40, 0.38, 0.25, 0.88),
    "et":         (0.80, 0.65, 0.98, 0.55),
    "net":        (0.82, 0.58, 0.46, 0.62),
    # enhancing vessel: bright after contrast, flow void (dark) on T2/FLAIR
    "vessel":     (0.20, 0.55, 0.95, 0.15),
    # choroid-plexus-like spot inside a ventricle: enhancing, intermediate elsewhere
    "plexus":     (0.55, 0.55, 0.92, 0.60),
}

#: The calibrated table (``cues=1``, the default). Healthy tissue and the confounders are as in
#: version 2; the tumour rows carry the cross-modal cues of real gliomas (docs/phantoms.md):
#: oedema and tumour hypo-intense on T1 and T1ce, necrosis dark on T1 and bright on T2 with FLAIR
#: signal above white matter (not nulled like CSF), the enhancing rim darker than oedema and
#: necrosis on T2, non-enhancing tumour brighter than oedema on T2 and darker on T1/T1ce.
SIGNAL: dict[str, tuple[float, float, float, float]] = {
    #              flair  t1    t1ce  t2
    "wm":         (0.55, 0.90, 0.62, 0.30),
    "gm":         (0.65, 0.65, 0.48, 0.42),
    "csf":        (0.05, 0.25, 0.20, 0.95),
    "ed":         (0.95, 0.44, 0.27, 0.80),
    "ncr":        (0.70, 0.24, 0.20, 0.85),
    "et":         (0.88, 0.42, 0.98, 0.62),
    "net":        (0.83, 0.32, 0.20, 0.85),
    "vessel":     (0.20, 0.55, 0.95, 0.15),
    "plexus":     (0.55, 0.55, 0.92, 0.60),
}

#: Oedema blend weight at the outer border of the whole tumour, per modality (MODALITIES order);
#: it rises to 1 over ``fade_mm`` inside. Version 2 used 0.35 everywhere (``cues=0``); FLAIR is the
#: most sensitive to the extra water at the oedema margin, T2 next (``cues=1``).
ED_BORDER_V2 = (0.35, 0.35, 0.35, 0.35)
ED_BORDER = (1.00, 0.85, 0.95, 0.95)

#: Largest fraction of sulcal CSF squeezed out next to the tumour at ``cues=1`` (sulcal effacement,
#: a mass-effect sign visible in every modality); 0 at ``cues=0``.
EFFACEMENT = 0.6

#: Where the label's boundaries lie off the image's (RMS displacement per axis, mm, of smooth random
#: fields with 6 mm correlation) at ``cues >= 1``; 0 at ``cues=0`` (labels exactly where the signal
#: changes). Real BraTS labels come from human raters who disagree (inter-rater Dice of 74-85 % over
#: the sub-regions, Menze et al. 2015), which caps the Dice any model reaches even with all four
#: modalities; without the slack a phantom model beats real-scan models when it has every modality
#: while it lags behind them with one. "core": the NCR/ET/NET layout, "wt": the tumour outline.
LABEL_SLACK_MM: dict[str, float] = {"core": 0.8, "wt": 0.6}

#: Signal range kept when ``cues`` extrapolates the tables (relative units, before bias and noise).
_SIGNAL_RANGE = (0.02, 1.0)


def _lerp(v2, v3, cues: float, lo: float, hi: float) -> np.ndarray:
    """``v2 + cues * (v3 - v2)`` clipped to [lo, hi] (float64; exactly ``v2`` at cues=0)."""
    v2, v3 = np.asarray(v2, np.float64), np.asarray(v3, np.float64)
    return np.clip(v2 + float(cues) * (v3 - v2), lo, hi)


def signal_table(cues: float = 1.0) -> dict[str, np.ndarray]:
    """The relative-signal table used at ``cues``: tissue -> (4,) float64, MODALITIES order.

    ``cues`` interpolates between :data:`SIGNAL_V2` (0) and :data:`SIGNAL` (1) and extrapolates
    beyond (> 1: the cross-modal contrasts grow further); signals stay in [0.02, 1].
    """
    cues = check_cues(cues)
    return {k: _lerp(SIGNAL_V2[k], SIGNAL[k], cues, *_SIGNAL_RANGE) for k in SIGNAL}


def ed_border(cues: float = 1.0) -> np.ndarray:
    """Oedema blend weight at the whole-tumour border per modality at ``cues``: (4,) in [0.05, 1]."""
    return _lerp(ED_BORDER_V2, ED_BORDER, check_cues(cues), 0.05, 1.0)


def check_cues(cues) -> float:
    """``cues`` as a float; ValueError unless it is finite and >= 0."""
    c = float(cues)
    if not np.isfinite(c) or c < 0:
        raise ValueError(f"cues must be a finite number >= 0, got {cues!r}")
    return c


#: Difficulty knobs: Rician noise (x mean brain signal), tumour contrast (blend weight of the tumour
#: signal over the healthy one), within-tissue texture SD, bias-field amplitude (log-SD of a 40 mm
#: smooth field), and how many confounders of each kind (min, max).
#: Texture 8 % and bias 0.15 were the first design. Looked at, both make blotches that read as
#: oedema-like FLAIR patches on grey matter (texture at 2 SD: +16 %; bias at 2 SD: +35 % over a
#: lobe), so "standard" uses texture 5 % and bias 0.10, and "hard" the first design's values and more.
#: (ET keeps its own 10 % heterogeneity at every level.)
DIFFICULTIES: dict[str, dict] = {
    "easy": dict(noise=0.03, contrast=1.0, texture=0.03, bias=0.05, vessels=(0, 0), plexus=(0, 0)),
    "standard": dict(noise=0.04, contrast=1.0, texture=0.05, bias=0.10, vessels=(3, 6), plexus=(1, 2)),
    "hard": dict(noise=0.055, contrast=0.75, texture=0.08, bias=0.15, vessels=(6, 10), plexus=(2, 3)),
}


__all__ = ["SIGNAL_V2", "SIGNAL", "ED_BORDER_V2", "ED_BORDER", "EFFACEMENT", "LABEL_SLACK_MM", "DIFFICULTIES",
           "signal_table", "ed_border", "check_cues"]
