"""Linear multistep (k-diffusion's `sample_lms`), as diffusers' LMSDiscreteScheduler.

In sigma form the probability-flow ODE is dx/dsigma = d(x, sigma) = (x - x_0) / sigma. Each step integrates
the Lagrange polynomial through the last `order` slopes (at their sigmas) from sigma_i to sigma_{i+1}
(Adams-Bashforth on the uneven sigma grid): x_{i+1} = x_i + sum_j c_j d_{i-j}, c_j the integral of basis
polynomial j. The polynomial has degree order - 1 <= 3, so Gauss-Legendre quadrature with `order` nodes is
exact (diffusers calls scipy's adaptive quad for the same number).
"""
import dataclasses

import numpy as np
import torch

from .base import SigmaConfig, step_output
from .common import check_float_timestep, predict_x0_sigma
from .sigma_loop import LoopSigmaScheduler, config_bounds, loop_sigmas


@dataclasses.dataclass
class LMSDiscreteConfig(SigmaConfig):  # the shared keys with diffusers' defaults (base.py)
    pass


def lms_coefficient(sigmas, order, i, j):
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial that is 1 at sigma_{i-j} and 0 at
    the other sigma_{i-k}, k < order (Gauss-Legendre with `order` nodes: exact for degree <= 2 order - 1)."""
    a, b = float(sigmas[i]), float(sigmas[i + 1])
    at = [float(sigmas[i - k]) for k in range(order)]  # the slopes' sigmas, newest first
    nodes, weights = np.polynomial.legendre.leggauss(order)
    tau = (b - a) / 2 * nodes + (a + b) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - at[k]) / (at[j] - at[k])
    return float((b - a) / 2 * np.dot(weights, basis))


class LMSDiscreteScheduler(LoopSigmaScheduler):
    config_dataclass = LMSDiscreteConfig

    def set_timesteps(self, num_inference_steps, device=None):
        self.num_inference_steps = num_inference_steps
        # (as diffusers, LMS's Karras schedule alone ignores carried sigma bounds)
        bounds = (None, None) if self.cfg.use_karras_sigmas else config_bounds(self)
        t, sigmas, _ = loop_sigmas(self.cfg, self.alphas_cumprod, num_inference_steps, bounds=bounds)
        self.sigmas = sigmas  # stays on the CPU: indexed once per step
        self.timesteps = torch.from_numpy(np.asarray(t)).to(device=device, dtype=torch.float32)
        self.derivatives = []  # the last `order` slopes, oldest first
        self.reset_loop()

    def get_lms_coefficient(self, order, t, current_order):
        return lms_coefficient(self.sigmas, order, t, current_order)

    def step(self, model_output, timestep, sample, order=4, return_dict=True):
        check_float_timestep("LMSDiscreteScheduler.step", timestep)
        i = self.enter_loop(timestep)
        sigma = self.sigmas[i]
        x0 = predict_x0_sigma(self.cfg.prediction_type, model_output, sample, sigma, sigma)
        self.derivatives.append((sample - x0) / sigma)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        # (as diffusers, the order follows the loop position, so a loop entered mid-way starts at full order
        # and uses only the first coefficients while it has fewer slopes)
        order = min(i + 1, order)
        coeffs = [lms_coefficient(self.sigmas, order, i, j) for j in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        self._step_index += 1
        return step_output(return_dict, prev_sample, x0)
