"""Rectified flows with exact answers, used as the "model" that proves samplers correct.

Data x0 is a mixture of Gaussians with diagonal covariances (one component: a plain Gaussian); x_t = (1 - t) x0 + t eps.
Then x_t | component k ~ N((1 - t) mu_k, C_k(t)), C_k(t) = (1 - t)^2 var_k + t^2, and the exact velocity
E[eps - x0 | x_t] is the posterior-weighted component velocity
    v_k = -mu_k + (t - (1 - t) var_k) / C_k(t) * (x - (1 - t) mu_k),
which stays finite on all of [0, 1]. For one Gaussian the probability-flow ODE from eps at t = 1 lands exactly on
mu + sqrt(var) eps; for a mixture the reference comes from a tight adaptive Runge-Kutta solve.
"""

import torch
from scipy.integrate import solve_ivp


class GaussianMixtureFlow:
    def __init__(self, weights, means, variances):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)          # (K, d)
        self.variances = torch.as_tensor(variances, dtype=torch.float64)  # (K, d)
        self.dim = self.means.shape[1]

    def velocity(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        centre = x[:, None, :] - (1 - t) * self.means                     # (B, K, d)
        c = (1 - t) ** 2 * self.variances + t ** 2
        log_w = self.weights.log() - 0.5 * (c.log().sum(-1) + (centre ** 2 / c).sum(-1))
        w = torch.softmax(log_w, dim=1)[..., None]
        v_k = -self.means + (t - (1 - t) * self.variances) / c * centre
        return (w * v_k).sum(1)

    def denoise(self, x, t):
        return x - t * self.velocity(x, t)

    def sample_data(self, n, generator):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.variances[k].sqrt() * noise

    def mean(self):
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self):
        mean = self.mean()
        second = sum(w * (torch.diag(v) + torch.outer(m, m))
                     for w, m, v in zip(self.weights, self.means, self.variances))
        return second - torch.outer(mean, mean)

    def ode_solution(self, x, t_start=1.0, t_end=0.0):
        """x at t_end of the probability-flow ODE started from x at t_start (from t = 1, x is the noise eps)."""
        if len(self.weights) == 1 and (t_start, t_end) == (1.0, 0.0):
            return self.means[0] + self.variances[0].sqrt() * x
        shape = x.shape
        fun = lambda t, y: self.velocity(torch.from_numpy(y).view(shape), t).flatten().numpy()
        sol = solve_ivp(fun, (t_start, t_end), x.flatten().numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
        return torch.from_numpy(sol.y[:, -1]).view(shape)


def consistency_function(flow, x, t):
    """For one Gaussian, the exact consistency model: where the ODE from (x, t) lands at t = 0 (a sample, not a
    mean)."""
    mean, var = flow.means[0], flow.variances[0]
    return mean + var.sqrt() * (x - (1 - t) * mean) / ((1 - t) ** 2 * var + t ** 2).sqrt()


def gaussian():
    return GaussianMixtureFlow([1.0], [[0.5, -1.0, 0.3]], [[0.25, 1.5, 0.6]])


def mixture():
    return GaussianMixtureFlow([0.3, 0.5, 0.2], [[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]],
                               [[0.3, 0.2], [0.15, 0.4], [0.25, 0.25]])
