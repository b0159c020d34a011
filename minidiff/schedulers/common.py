"""The schedulers' shared math, as plain functions: the training noise schedule (betas -> alphas_cumprod ->
sigmas), the inference timesteps and sigma schedules (evenly spaced, Karras, exponential, beta), the model's
x_0 / noise predictions, thresholding, diffusers-compatible noise drawing and the config checks.
(The base class, config files and loop position are in base.py.)

Noise levels are written two ways. DDPM-style schedulers (DDIM, PNDM, LCM) use alphas_cumprod:
x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps. k-diffusion-style ones (Euler) use sigma_t = sqrt((1 - a_t) / a_t):
x_t / sqrt(a_t) = x_0 + sigma_t eps.
"""
import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------------------------
# Training noise schedule


def cosine_betas(num_train_timesteps, max_beta=0.999):
    """Nichol & Dhariwal's squared cosine: alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2), betas capped."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    n = num_train_timesteps
    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                        dtype=torch.float32)


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2023 (Algorithm 1): shift and scale sqrt(alphas_cumprod) so the last step is pure noise,
    keeping the first step where it was."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphas_cumprod = root ** 2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def make_betas(config):
    """The training betas (float32) that config.json describes."""
    c = config
    if c.trained_betas is not None:
        betas = torch.tensor(c.trained_betas, dtype=torch.float32)
    elif c.beta_schedule == "linear":
        betas = torch.linspace(c.beta_start, c.beta_end, c.num_train_timesteps, dtype=torch.float32)
    elif c.beta_schedule == "scaled_linear":  # linear in sqrt(beta), Stable Diffusion's schedule
        betas = torch.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, c.num_train_timesteps, dtype=torch.float32) ** 2
    else:
        betas = cosine_betas(c.num_train_timesteps)
    if getattr(c, "rescale_betas_zero_snr", False):  # a key some schedulers do not have (PNDM)
        betas = rescale_zero_terminal_snr(betas)
    return betas


def train_schedule(config):
    """(betas, alphas_cumprod) of the training noise schedule a config describes."""
    betas = make_betas(config)
    return betas, torch.cumprod(1.0 - betas, dim=0)


def alpha_schedule(config):
    """(betas, alphas_cumprod, final_alpha_cumprod) of the DDPM-style schedulers. The final value is where
    the last step lands: a = 1 exactly (`set_alpha_to_one`), or the first training step's a."""
    betas, alphas_cumprod = train_schedule(config)
    final = torch.tensor(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
    return betas, alphas_cumprod, final


def alpha_at(scheduler, t):
    """alphas_cumprod at training step t; t < 0 (a step past the first training step) is the final value."""
    return scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod


def train_sigmas(alphas_cumprod):
    """sigma_t = sqrt((1 - a_t) / a_t) for every training step, ascending in t."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def sigma_schedule(config):
    """(betas, alphas_cumprod, sigmas) of the Euler samplers before set_timesteps: every training step,
    noisiest first, then sigma 0."""
    betas = make_betas(config)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if getattr(config, "rescale_betas_zero_snr", False):
        alphas_cumprod[-1] = 2 ** -24  # zero terminal SNR would make the last sigma infinite
    sigmas = torch.cat([train_sigmas(alphas_cumprod).flip(0), torch.zeros(1)])
    return betas, alphas_cumprod, sigmas


# ---------------------------------------------------------------------------------------------
# Inference timesteps


def spaced_timesteps(config, num_inference_steps, round_linspace):
    """Descending inference timesteps (float64 numpy), Table 2 of Lin et al. 2023:
    "leading" k * (N // n) + steps_offset, "trailing" round(N - k N / n) - 1, "linspace" over [0, N - 1]
    (rounded for the DDPM-style schedulers, fractional for Euler)."""
    N, n = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "leading":
        return (np.arange(0, n) * (N // n)).round()[::-1].astype(np.float64) + config.steps_offset
    if config.timestep_spacing == "trailing":
        return np.arange(N, 0, -N / n).round() - 1
    t = np.linspace(0, N - 1, n)
    return (t.round() if round_linspace else t)[::-1].copy()


def spaced_sigmas(config, alphas_cumprod, num_inference_steps, timesteps=None):
    """The Euler samplers' loop: timesteps (float32 numpy; spaced by `timestep_spacing` unless given) and the
    sigma at each (float64), interpolated linearly between training steps since they may be fractional."""
    if timesteps is None:
        timesteps = spaced_timesteps(config, num_inference_steps, round_linspace=False)
    timesteps = np.array(timesteps).astype(np.float32)
    sigmas = train_sigmas(alphas_cumprod).numpy()
    return timesteps, np.interp(timesteps, np.arange(len(sigmas)), sigmas)


def sigma_to_t(sigmas, log_sigmas):
    """Fractional training timestep of each sigma: linear interpolation in log sigma over the training
    schedule (`log_sigmas` ascending with t), clamped to its ends (diffusers' `_sigma_to_t`)."""
    sigmas = np.asarray(sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _bounds(in_sigmas, sigma_min, sigma_max):
    lo = sigma_min if sigma_min is not None else float(in_sigmas[-1])
    hi = sigma_max if sigma_max is not None else float(in_sigmas[0])
    return lo, hi


def karras_sigmas(in_sigmas, num_inference_steps, sigma_min=None, sigma_max=None, rho=7.0):
    """Karras et al. 2022 (eq. 5): n noise levels evenly spaced in sigma^(1/rho), from sigma_max down to
    sigma_min (by default the ends of `in_sigmas`, descending)."""
    lo, hi = _bounds(in_sigmas, sigma_min, sigma_max)
    ramp = np.linspace(0, 1, num_inference_steps)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def exponential_sigmas(in_sigmas, num_inference_steps, sigma_min=None, sigma_max=None):
    """n noise levels evenly spaced in log sigma (k-diffusion's `get_sigmas_exponential`)."""
    lo, hi = _bounds(in_sigmas, sigma_min, sigma_max)
    return np.exp(np.linspace(math.log(hi), math.log(lo), num_inference_steps))


def beta_sigmas(in_sigmas, num_inference_steps, sigma_min=None, sigma_max=None, alpha=0.6, beta=0.6):
    """Lee et al. 2024, "Beta Sampling is All You Need": sigma_min + (sigma_max - sigma_min) times the
    Beta(alpha, beta) quantiles of 1 - linspace(0, 1, n), so steps crowd at both ends of the schedule."""
    lo, hi = _bounds(in_sigmas, sigma_min, sigma_max)
    return np.array([lo + beta_ppf(q, alpha, beta) * (hi - lo) for q in 1 - np.linspace(0, 1, num_inference_steps)])


def betainc(a, b, x):
    """Regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point
        return 1.0 - betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    f, c, d, tiny = 1.0, 1.0, 0.0, 1e-300
    for i in range(1000):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-16:
            break
    return front * (f - 1.0)


def beta_ppf(q, a, b):
    """Quantile of the Beta(a, b) distribution (scipy.stats.beta.ppf), by bisection on betainc."""
    if q <= 0.0 or q >= 1.0:
        return 0.0 if q <= 0.0 else 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:  # the interval is one float wide
            break
        lo, hi = (mid, hi) if betainc(a, b, mid) < q else (lo, mid)
    return 0.5 * (lo + hi)


def convert_sigmas(cfg, in_sigmas, num_inference_steps, sigma_min=None, sigma_max=None):
    """The sigma schedule the config asks for (use_karras_sigmas, use_exponential_sigmas or use_beta_sigmas)
    over the range of `in_sigmas` (descending) or of the given bounds; None when it asks for none."""
    for flag, schedule in (("use_karras_sigmas", karras_sigmas), ("use_exponential_sigmas", exponential_sigmas),
                           ("use_beta_sigmas", beta_sigmas)):
        if getattr(cfg, flag, False):
            return schedule(in_sigmas, num_inference_steps, sigma_min, sigma_max)
    return None


def start_noise_std(scheduler):
    """init_noise_sigma of the Euler samplers, as diffusers sets it: sigma_max for "linspace" and "trailing",
    sqrt(sigma_max^2 + 1) for "leading"."""
    top = scheduler.sigmas.max()
    return top if scheduler.config.timestep_spacing in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5


# ---------------------------------------------------------------------------------------------
# What the model predicts, turned into x_0 and the noise


def predict_x0(prediction_type, model_output, sample, a_t):
    """x_0 from x_t (= sample) at signal level a_t, for an eps-, x_0- ("sample") or v-predicting model."""
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        return (sample - b_t ** 0.5 * model_output) / a_t ** 0.5
    if prediction_type == "sample":
        return model_output
    return a_t ** 0.5 * sample - b_t ** 0.5 * model_output  # v = sqrt(a) eps - sqrt(1 - a) x_0


def predict_eps(prediction_type, model_output, sample, a_t, x0=None):
    """The noise in x_t: the output itself, from v, or the noise that the estimate x0 implies ("sample")."""
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return a_t ** 0.5 * model_output + b_t ** 0.5 * sample
    return (sample - a_t ** 0.5 * x0) / b_t ** 0.5


def predict_x0_sigma(prediction_type, model_output, sample, sigma, sigma_hat):
    """x_0 in sigma form (x = x_0 + sigma eps). `sigma_hat` is the level after Euler's optional churn: the eps
    form uses it, the v form uses the unchurned sigma (both as diffusers does)."""
    if prediction_type == "epsilon":
        return sample - sigma_hat * model_output
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1 - a) x_0, written with sigma
        return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + sample / (sigma ** 2 + 1)
    return model_output


def euler_step(sample, x0, sigma, sigma_next):
    """One Euler step of the probability-flow ODE dx/dsigma = (x - x_0) / sigma, from sigma to sigma_next."""
    derivative = (sample - x0) / sigma
    return sample + derivative * (sigma_next - sigma)


def threshold_sample(x0, ratio, max_value):
    """Dynamic thresholding (Saharia et al. 2022, Imagen): per image, s = the `ratio` quantile of |x_0|,
    clamped to [1, max_value]; x_0 is clipped to [-s, s] and divided by s (computed in fp32)."""
    dtype, shape = x0.dtype, x0.shape
    flat = x0.float() if dtype not in (torch.float32, torch.float64) else x0
    flat = flat.reshape(shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(shape).to(dtype)


def check_float_timestep(where, timestep):
    """The sigma schedulers look timesteps up by value; an int is almost surely a loop counter."""
    if isinstance(timestep, int) or (torch.is_tensor(timestep) and not timestep.is_floating_point()):
        raise ValueError(f"{where}: timestep={timestep!r} looks like a loop index; pass the value from "
                         "`scheduler.timesteps` (a float tensor)")


def check_timesteps(where, timesteps, num_train_timesteps):
    """Custom `timesteps` for set_timesteps (DDPM, LCM, TCD): descending, below the training steps."""
    if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"{where}: timesteps must be descending, got {list(timesteps)}")
    if timesteps[0] >= num_train_timesteps:
        raise ValueError(f"{where}: timesteps must be below {num_train_timesteps}, got {timesteps[0]}")


# ---------------------------------------------------------------------------------------------
# Loop position


def index_for_timestep(schedule, timestep):
    """Position of `timestep` in `schedule`. Where it occurs twice (a schedule entered mid-way by img2img can
    repeat its first value), the second occurrence, so no noise level is skipped."""
    if torch.is_tensor(timestep):
        timestep = timestep.to(schedule.device)
    hits = (schedule == timestep).nonzero()
    if len(hits) == 0:
        raise ValueError(f"timestep {timestep} is not in the scheduler's timesteps {schedule.tolist()}; pass one of "
                         "`scheduler.timesteps` (after set_timesteps)")
    return hits[1 if len(hits) > 1 else 0].item()


# ---------------------------------------------------------------------------------------------
# Noise


def randn_tensor(shape, generator=None, device=None, dtype=None):
    """Gaussian noise drawn as diffusers draws it, so a seed gives the same image as diffusers.

    A CPU generator draws on the CPU and the result moves to `device`; a list of generators draws
    (1, ...) per batch item in order and concatenates. With no device the result is on the CPU.
    """
    device = torch.device(device) if isinstance(device, str) else device
    target = device or torch.device("cpu")
    draw_on = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type == "cpu" and target.type != "cpu":
            draw_on = "cpu"
        elif gen_type != target.type and gen_type == "cuda":
            raise ValueError(f"cannot draw a {target} tensor from a {gen_type} generator: use a CPU generator "
                             f"or one on {target}")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"a list of {len(generator)} generators was given for a batch of {shape[0]}: "
                             "pass one generator per batch item")
        one = (1,) + tuple(shape[1:])
        return torch.cat([torch.randn(one, generator=g, device=draw_on, dtype=dtype) for g in generator]).to(target)
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(target)


# ---------------------------------------------------------------------------------------------
# Config checks (validate() helpers)


def check_choice(where, key, value, allowed):
    """validate() helper: a config value must be one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{where}: {key}={value!r} is not supported (choose from {', '.join(map(repr, allowed))})")


def check_schedule(config, where, prediction_types):
    """validate() checks of the DDPM-family configs: beta schedule, prediction type, timestep spacing."""
    if config.trained_betas is None:  # given betas make beta_schedule moot
        check_choice(where, "beta_schedule", config.beta_schedule, BETA_SCHEDULES)
    check_choice(where, "prediction_type", config.prediction_type, prediction_types)
    check_choice(where, "timestep_spacing", config.timestep_spacing, SPACINGS)


def check_sigma_schedule(config, where):
    """validate() helper: at most one of the Karras, exponential and beta sigma schedules."""
    flags = [f for f in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if getattr(config, f, False)]
    if len(flags) > 1:
        raise ValueError(f"{where}: {' and '.join(f'{f}=True' for f in flags)}: choose at most one sigma schedule")
