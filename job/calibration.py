"""Temperature scaling (Guo et al., 2017): one scalar T, fitted on validation by NLL.

The model outputs softmax probabilities, so the logits are log p up to a
constant, which softmax ignores: calibrated = softmax(log p / T). T leaves the
argmax, and so accuracy and balanced accuracy, unchanged.
"""

import numpy as np
from scipy import optimize, special
from sklearn import metrics as skm

# Probabilities are clipped here before any log: scikit-learn's log_loss would clip at
# float64's eps (2e-16) instead, which weighs one confident mistake several times more and
# so moves the fitted temperature.
EPSILON = 1e-12


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
  return special.softmax(np.log(np.clip(probabilities, EPSILON, 1)) / temperature, axis=1)


def negative_log_likelihood(labels: np.ndarray, probabilities: np.ndarray) -> float:
  """Mean −log p(true class), with p clipped at EPSILON (scikit-learn's log_loss)."""
  clipped = np.clip(probabilities, EPSILON, 1)
  return float(skm.log_loss(labels, clipped / clipped.sum(axis=1, keepdims=True),
                            labels=list(range(probabilities.shape[1]))))


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float:
  def nll(log_t):
    return negative_log_likelihood(labels, apply_temperature(probabilities, np.exp(log_t)))
  result = optimize.minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
  return float(np.exp(result.x))
