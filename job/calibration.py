"""Temperature scaling (Guo et al., 2017): one scalar T, fitted on validation by NLL.

The model outputs softmax probabilities, so the logits are log p up to a
constant, which softmax ignores: calibrated = softmax(log p / T). T leaves the
argmax, and so accuracy and balanced accuracy, unchanged.
"""

import numpy as np
from scipy import optimize, special

EPSILON = 1e-12


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
  return special.softmax(np.log(np.clip(probabilities, EPSILON, 1)) / temperature, axis=1)


def negative_log_likelihood(labels: np.ndarray, probabilities: np.ndarray) -> float:
  return float(-np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], EPSILON, 1))))


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float:
  def nll(log_t):
    return negative_log_likelihood(labels, apply_temperature(probabilities, np.exp(log_t)))
  result = optimize.minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
  return float(np.exp(result.x))
