"""Calibration: timestep samplers, recording and replaying denoiser calls, and the calibration run
(:mod:`dmquant.calibration.run`) with its phases: collect, outliers, observe, reconstruct."""
