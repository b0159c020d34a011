"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models"), as diffusers' PNDMScheduler.

The transfer x_t -> x_t' (the paper's phi) is DDIM's deterministic step with a given noise
estimate. PLMS feeds it a linear-multistep combination of the last noise predictions (Adams-Bashforth
of order 1..4). Its first step t0 -> t1 is taken twice: with eps(x_t0), then again from x_t0 with the
mean of eps(x_t0) and eps at the result (a Heun step), which is why `timesteps` lists t1 twice.
Without `skip_prk_steps` the first three steps are pseudo Runge-Kutta (RK4, 4 UNet calls each) instead.
"""
import dataclasses

import numpy as np
import torch

from .base import KARRAS_SCHEDULERS, Scheduler, TrainScheduleConfig, step_output
from .common import alpha_at, alpha_schedule, predict_eps, spaced_timesteps


@dataclasses.dataclass
class PNDMConfig(TrainScheduleConfig):
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    prediction_types = ("epsilon", "v_prediction")


class PNDMScheduler(Scheduler):
    """Starts from unit Gaussian noise; the UNet input is not scaled; keeps its own call counter."""
    config_dataclass = PNDMConfig
    _compatibles = KARRAS_SCHEDULERS

    def __init__(self, **config):
        super().__init__(**config)
        self.betas, self.alphas_cumprod, self.final_alpha_cumprod = alpha_schedule(self.cfg)
        self.timesteps = None
        self._reset()

    def _reset(self):
        self.counter = 0  # UNet calls so far in this loop
        self.ets = []  # past noise predictions, newest last (at most 4 used)
        self.cur_sample = None  # x_t at the start of a multi-call step
        self.cur_model_output = 0  # Runge-Kutta: weighted sum of the stage slopes

    def scale_model_input(self, sample, *args, **kwargs):
        return sample

    def set_timesteps(self, num_inference_steps, device=None):
        c = self.cfg
        self.num_inference_steps = num_inference_steps
        steps = spaced_timesteps(c, num_inference_steps, round_linspace=True)[::-1].astype(np.int64)  # ascending
        if c.skip_prk_steps:
            # PLMS only: the second timestep comes twice (the Heun step), e.g. 981, 961, 961, 941, ..., 1
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([steps[:-1], steps[-2:-1], steps[-1:]])[::-1].copy()
        else:
            # three RK4 steps over the three highest intervals, each visiting t, t - h/2, t - h/2, t - h
            half = c.num_train_timesteps // num_inference_steps // 2
            tops = steps[-4:].repeat(2) + np.tile(np.array([0, half]), 4)
            self.prk_timesteps = tops[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = steps[:-3][::-1].copy()
        self.timesteps = torch.from_numpy(np.concatenate([self.prk_timesteps, self.plms_timesteps])
                                          .astype(np.int64)).to(device)
        self._reset()

    def step(self, model_output, timestep, sample, return_dict=True):
        if self.num_inference_steps is None:
            raise ValueError("PNDMScheduler.step: call set_timesteps first")
        if self.counter < len(self.prk_timesteps) and not self.cfg.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict)

    def step_prk(self, model_output, timestep, sample, return_dict=True):
        """One call of a Runge-Kutta step (diffusers' public method; `step` picks it for the first calls)."""
        prev_sample = self._prk(model_output, int(timestep), sample)
        self.counter += 1
        return step_output(return_dict, prev_sample)

    def step_plms(self, model_output, timestep, sample, return_dict=True):
        """One linear multistep step (diffusers' public method; `step` picks it after the Runge-Kutta calls)."""
        prev_sample = self._plms(model_output, int(timestep), sample)
        self.counter += 1
        return step_output(return_dict, prev_sample)

    def _prk(self, model_output, timestep, sample):
        # RK4 over [t, t - h]: slopes k1..k4 at t, t - h/2, t - h/2, t - h; each call also returns the
        # next stage's input (x at t - h/2, or at t - h), always transferred from x_t
        stage = self.counter % 4
        h = self.cfg.num_train_timesteps // self.num_inference_steps
        t_to = timestep - (0 if self.counter % 2 else h // 2)
        t_from = int(self.prk_timesteps[self.counter - stage])
        if stage == 0:
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output += 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        return self._transfer(self.cur_sample, t_from, t_to, model_output)

    def _plms(self, model_output, timestep, sample):
        if not self.cfg.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("PNDMScheduler: the PLMS steps need the three Runge-Kutta steps first; run the loop "
                             "over `scheduler.timesteps` from its start")
        h = self.cfg.num_train_timesteps // self.num_inference_steps
        t_from, t_to = timestep, timestep - h
        if self.counter == 1:  # the Heun repeat of the first step: again from t + h to t
            t_from, t_to = timestep + h, timestep
        else:
            self.ets = self.ets[-3:] + [model_output]
        e = self.ets
        if len(e) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(e) == 1 and self.counter == 1:
            model_output = (model_output + e[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(e) == 2:
            model_output = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            model_output = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        return self._transfer(sample, t_from, t_to, model_output)

    def _transfer(self, sample, t, t_prev, eps):
        """The transfer phi: x_t' from x_t and a noise estimate (DDIM's deterministic step, rearranged)."""
        a_t, a_prev = self.alphas_cumprod[t], alpha_at(self, t_prev)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        eps = predict_eps(self.cfg.prediction_type, eps, sample, a_t)  # v-prediction -> noise
        sample_coeff = (a_prev / a_t) ** 0.5
        eps_denominator = a_t * b_prev ** 0.5 + (a_t * b_t * a_prev) ** 0.5
        return sample_coeff * sample - (a_prev - a_t) * eps / eps_denominator
