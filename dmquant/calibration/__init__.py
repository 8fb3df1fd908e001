"""Calibration: timestep samplers, collection of denoiser inputs, observation passes."""
