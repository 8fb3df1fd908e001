"""Noise correction around the scheduler: the quantized denoiser's error treated as noise (PTQD)."""

from dmquant.correction.ptqd import (
    NoiseCorrection,
    NoiseCorrectionStats,
    apply_noise_correction,
    fit_noise_correction,
    remove_noise_correction,
)

__all__ = ["NoiseCorrection", "NoiseCorrectionStats", "apply_noise_correction", "fit_noise_correction",
           "remove_noise_correction"]
