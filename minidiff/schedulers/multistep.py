"""What the DPM-Solver family (DPM-Solver multistep and singlestep, UniPC, DEIS) shares.

These solvers work in log-SNR time lambda = log(alpha / sigma) of the variance-preserving process
x_t = alpha_t x_0 + sigma_t eps, with alpha = 1 / sqrt(s^2 + 1), sigma = s alpha for the Euler-style noise
level s. They keep the last model outputs (converted to x_0 or eps) for their multistep formulas, leave the
UNet input unscaled and start from unit noise.
"""
import dataclasses

import numpy as np
import torch

from .base import SigmaScheduler, TrainScheduleConfig
from .common import check_choice, convert_sigmas, sigma_schedule, sigma_to_t, threshold_sample, train_sigmas


def alpha_sigma(s):
    """(alpha_t, sigma_t) of the VP process at Euler-style noise level s."""
    alpha = 1 / ((s ** 2 + 1) ** 0.5)
    return alpha, s * alpha


def log_snr(s):
    """lambda = log(alpha) - log(sigma) at noise level s (+inf at s = 0)."""
    alpha, sigma = alpha_sigma(s)
    return torch.log(alpha) - torch.log(sigma)


def solver_timesteps(cfg, n, last=None):
    """n integer timesteps, descending: spacing over n + 1 points with the last (t = 0) dropped, for
    "linspace" and "leading"; `last` (default num_train_timesteps) is where lambda clipping ends the range."""
    N = cfg.num_train_timesteps
    last = N if last is None else last
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if cfg.timestep_spacing == "leading":
        return (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].copy().astype(np.int64) + cfg.steps_offset
    return np.arange(last, 0, -N / n).round().copy().astype(np.int64) - 1


def solver_sigmas(scheduler, timesteps, n, round_karras=True):
    """(sigmas of the loop, timesteps): interpolated at the spaced timesteps, or the config's Karras /
    exponential / beta schedule with the timesteps following it (Karras ones rounded)."""
    sigmas = np.array(train_sigmas(scheduler.alphas_cumprod))
    log_sigmas = np.log(sigmas)
    config = scheduler.config  # diffusers reads the bounds from .config, keys carried from another class included
    converted = convert_sigmas(scheduler.cfg, np.flip(sigmas).copy(), n, config.get("sigma_min"), config.get("sigma_max"))
    if converted is None:
        return np.interp(timesteps, np.arange(0, len(sigmas)), sigmas), timesteps
    timesteps = sigma_to_t(converted, log_sigmas)
    return converted, timesteps.round() if round_karras and scheduler.cfg.use_karras_sigmas else timesteps


def data_prediction(cfg, model_output, sample, s):
    """x_0 from the model's output at noise level s (eps, x_0 or v), thresholded if the config asks."""
    alpha_t, sigma_t = alpha_sigma(s)
    if cfg.prediction_type == "epsilon":
        x0 = (sample - sigma_t * model_output) / alpha_t
    elif cfg.prediction_type == "sample":
        x0 = model_output
    else:
        x0 = alpha_t * sample - sigma_t * model_output
    return threshold_sample(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value) if cfg.thresholding else x0


def noise_prediction(cfg, model_output, sample, s):
    """eps from the model's output at noise level s (eps, x_0 or v)."""
    alpha_t, sigma_t = alpha_sigma(s)
    if cfg.prediction_type == "epsilon":
        return model_output
    if cfg.prediction_type == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    return alpha_t * model_output + sigma_t * sample


def dpm_combine(algorithm, h, s_to, s_from, midpoint, D, x, noise=None):
    """DPM-Solver's step over h in lambda from x at level s_from to s_to, given the Taylor terms D_0..D_2 of the
    model output: x_t = ratio x + sum_k c_k D_k (+ noise), each c_k the exact integral of its term. `midpoint`
    takes the second-order term the midpoint way (else as Heun / the full expansion)."""
    (alpha_t, sigma_t), (alpha_s, sigma_s) = alpha_sigma(s_to), alpha_sigma(s_from)
    if algorithm == "dpmsolver++":  # data prediction
        e = torch.exp(-h) - 1.0
        ratio, c = sigma_t / sigma_s, [-(alpha_t * e)]
        c.append(-(0.5 * (alpha_t * e)) if midpoint else alpha_t * (e / h + 1.0))
        c.append(-(alpha_t * ((torch.exp(-h) - 1.0 + h) / h ** 2 - 0.5)))
        noise_std = None
    elif algorithm == "dpmsolver":  # noise prediction
        e = torch.exp(h) - 1.0
        ratio, c = alpha_t / alpha_s, [-(sigma_t * e)]
        c.append(-(0.5 * (sigma_t * e)) if midpoint else -(sigma_t * (e / h - 1.0)))
        c.append(-(sigma_t * ((torch.exp(h) - 1.0 - h) / h ** 2 - 0.5)))
        noise_std = None
    elif algorithm == "sde-dpmsolver++":
        e = 1 - torch.exp(-2.0 * h)
        ratio, c = sigma_t / sigma_s * torch.exp(-h), [alpha_t * e]
        c.append(0.5 * (alpha_t * e) if midpoint else alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0))
        c.append(alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5))
        noise_std = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
    else:  # sde-dpmsolver (orders 1 and 2)
        e = torch.exp(h) - 1.0
        ratio, c = alpha_t / alpha_s, [-(2.0 * (sigma_t * e))]
        c.append(-(sigma_t * e) if midpoint else -(2.0 * (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0))))
        noise_std = sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0)
    x_t = ratio * x
    for c_k, D_k in zip(c, D):
        x_t = x_t + c_k * D_k
    return x_t if noise_std is None else x_t + noise_std * noise


def check_solver(cfg, where):
    """validate() checks shared by the solvers (prediction types; flow-matching options are not built)."""
    check_choice(where, "prediction_type", cfg.prediction_type, ("epsilon", "sample", "v_prediction"))
    check_choice(where, "solver_order", cfg.solver_order, (1, 2, 3))


@dataclasses.dataclass
class SolverConfig(TrainScheduleConfig):
    """The config keys the four solvers share (each file adds its own)."""
    solver_order: int = 2
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False

    # keys diffusers has for flow-matching models: accepted at these values only
    NEUTRAL = {"use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False,
               "time_shift_type": "exponential"}


class MultistepScheduler(SigmaScheduler):
    """Base of the solvers: the training schedule, the output history, and add_noise in (alpha, sigma) form."""
    init_noise_sigma = 1.0

    def __init__(self, **config):
        super().__init__(**config)
        self.betas, self.alphas_cumprod, _ = sigma_schedule(self.cfg)
        self.alpha_t, self.sigma_t = torch.sqrt(self.alphas_cumprod), torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = train_sigmas(self.alphas_cumprod)  # ascending until set_timesteps
        N = self.cfg.num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, N - 1, N, dtype=np.float32)[::-1].copy())
        self.reset_history()

    def reset_history(self):
        self.model_outputs = [None] * self.cfg.solver_order  # converted outputs, newest last
        self.lower_order_nums = 0  # steps taken so far, capped at solver_order

    def set_loop(self, timesteps, sigmas, device):
        """Install a new loop (sigmas already end with the final level)."""
        self.sigmas = torch.from_numpy(sigmas.astype(np.float32))  # stays on the CPU: indexed per step
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self.reset_history()
        self.reset_loop()

    def remember(self, model_output):
        self.model_outputs = self.model_outputs[1:] + [model_output]

    def step_order(self, lower_final, lower_second):
        """The multistep order of this step: it grows with the outputs remembered, up to solver_order; the final
        (or second to last) step of a short loop may ask for first (second) order."""
        c = self.cfg
        if c.solver_order == 1 or self.lower_order_nums < 1 or lower_final:
            return 1
        if c.solver_order == 2 or self.lower_order_nums < 2 or lower_second:
            return 2
        return 3

    def convert_model_output(self, model_output, *args, sample=None):
        """DPM-Solver's: x_0 (dpmsolver++) or eps (dpmsolver) from the model output at the current noise level."""
        c, s = self.cfg, self.sigmas[self.step_index]
        if c.prediction_type == "epsilon" and c.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, :3]
        if c.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            return data_prediction(c, model_output, sample, s)
        eps = noise_prediction(c, model_output, sample, s)
        if c.thresholding:  # threshold the x_0 this noise implies, then turn it back into noise
            alpha_t, sigma_t = alpha_sigma(s)
            x0 = threshold_sample((sample - sigma_t * eps) / alpha_t, c.dynamic_thresholding_ratio, c.sample_max_value)
            eps = (sample - alpha_t * x0) / sigma_t
        return eps


    def scale_model_input(self, sample, *args, **kwargs):
        return sample

    def add_noise(self, original_samples, noise, timesteps):
        """alpha_t x_0 + sigma_t noise at the loop's noise level for each timestep."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        s = sigmas[self.noise_level_indices(timesteps, original_samples.device)].flatten()
        alpha_t, sigma_t = alpha_sigma(s.view((-1,) + (1,) * (original_samples.ndim - 1)))
        return alpha_t * original_samples + sigma_t * noise
