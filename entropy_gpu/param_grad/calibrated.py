"""The same-position measure with a calibrated correction for the cross-position paths.

The same-position measure (:func:`~entropy_gpu.param_grad.estimate.same_position_grad_norms`)
drops every path by which a parameter reaches ``z_{t-1}[y_t]`` through another position's
keys and values. On SmolLM2-135M-Instruct those paths carry most of the exact norm (the
exact norm is ~2.7x the same-position one, layer 1's ~5x, the top layer's ~1.3x), and the
share they carry grows where attention is spread over the context. The same-position
``rho(entropy, measure)`` is therefore biased low (more inversion than there is).

The calibrated score predicts the exact norm's logarithm, within a response, from two
features of the same single forward+backward pass, per layer ``l``:

    log score_t = sum_l w_l log same_l(t) + sum_l b_l H_attn,l(t)

``same_l`` is the layer's same-position Frobenius norm, ``H_attn,l`` the entropy of the
predicting position's attention distribution (mean over heads), recorded from the scores
the pass computes anyway. The weights come from a ridge fit on exact norms of one model
(:func:`fit_calibration`, within-response centred, so only the shape within a response is
fitted): a :class:`MeasureCalibration` belongs to the model it was fitted on. The score's
scale is arbitrary (no intercept): it serves per-response correlations, not norm values.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .estimate import recording_attention_entropy, same_position_grad_norms
from .model_parts import DEFAULT_PARAM_PATTERNS

_TINY = 1e-30  # floor under a layer's norm before its logarithm (a layer off the path has 0)


@dataclass(frozen=True)
class MeasureCalibration:
    """Weights of the calibrated score for one model (see the module docstring)."""

    layer_names: tuple[str, ...]            #: the layers of ``same_weights`` (parameter groups)
    same_weights: tuple[float, ...]         #: per layer, on ``log same_l``
    attention_weights: tuple[float, ...]    #: per attention layer, on its attention entropy
    ridge: float = 0.0
    one_hop_values: bool = False            #: the same-position norms keep the one-hop value paths
    model: str = ""                         #: what it was fitted on, for the reader
    fitted_on: str = ""

    def __post_init__(self) -> None:
        if len(self.same_weights) != len(self.layer_names):
            raise ValueError(f"{len(self.same_weights)} same-position weights for "
                             f"{len(self.layer_names)} layers")
        if not all(np.isfinite(self.same_weights)) or not all(np.isfinite(self.attention_weights)):
            raise ValueError("calibration weights must be finite")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MeasureCalibration:
        raw = json.loads(Path(path).read_text())
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


@dataclass
class CalibrationFeatures:
    """The calibrated score's inputs for a batch, aligned with ``input_ids`` (0 off the mask)."""

    mask: Tensor                #: [B, T] bool, the scored tokens
    logits: Tensor              #: [B, T] raw logit z_{t-1}[y_t] the pass differentiated
    same_per_layer: Tensor      #: [B, T, L] same-position Frobenius norm per layer
    attention_entropy: Tensor   #: [B, T, A] attention entropy (nats) of the predicting position
    layer_names: tuple[str, ...]


def calibration_features(model: nn.Module, input_ids: Tensor, response_mask: Tensor, *,
                         attention_mask: Tensor | None = None,
                         param_patterns: str | Iterable[str] = DEFAULT_PARAM_PATTERNS,
                         check_logits: bool = True, one_hop_values: bool = False) -> CalibrationFeatures:
    """Per-layer same-position norms (``one_hop_values``: with the one-hop value paths, see
    :func:`~entropy_gpu.param_grad.estimate.same_position_grad_norms`) and attention entropies
    of every scored token, from one same-position forward and backward (the attention entropies
    come from the scores that pass computes for the own-position weights)."""
    with recording_attention_entropy() as record:
        same = same_position_grad_norms(model, input_ids, response_mask, attention_mask=attention_mask,
                                        param_patterns=param_patterns, norms="fro", check_logits=check_logits,
                                        one_hop_values=one_hop_values)
    if not record:
        raise ValueError("no attention layer ran the same-position attention; the model is not supported")
    per_query = torch.stack(list(record.values()), -1)             # [B, T, A], at the query position
    mask = same.mask
    entropy = torch.zeros_like(per_query)
    entropy[:, 1:] = per_query[:, :-1]                              # token t is predicted at t - 1
    # Padding queries attend to nothing (NaN entropy): keep the scored tokens only.
    entropy = torch.where(mask[..., None], entropy, torch.zeros_like(entropy))
    return CalibrationFeatures(mask=mask, logits=same.logits, same_per_layer=same.per_layer["fro"],
                               attention_entropy=entropy, layer_names=same.layer_names)


def calibrated_scores(features: CalibrationFeatures, calibration: MeasureCalibration) -> Tensor:
    """``[B, T]`` float64 calibrated score of every scored token (0 off the mask), relative
    within each row: the row's largest score is 1 (the scale carries no information, and a
    fixed one would under- or overflow)."""
    if tuple(features.layer_names) != tuple(calibration.layer_names):
        raise ValueError("the calibration was fitted on other layers "
                         f"({len(calibration.layer_names)}: {calibration.layer_names[:2]}...) than these "
                         f"({len(features.layer_names)}: {features.layer_names[:2]}...)")
    if features.attention_entropy.shape[-1] != len(calibration.attention_weights):
        raise ValueError(f"the calibration has {len(calibration.attention_weights)} attention weights, "
                         f"the model {features.attention_entropy.shape[-1]} attention layers")
    same = features.same_per_layer.double().clamp_min(_TINY).log()
    w = torch.tensor(calibration.same_weights, dtype=torch.float64, device=same.device)
    b = torch.tensor(calibration.attention_weights, dtype=torch.float64, device=same.device)
    log_score = same @ w + features.attention_entropy.double() @ b
    log_score = log_score.masked_fill(~features.mask, float("-inf"))
    top = log_score.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).min)  # a row with no token
    return (log_score - top).exp()


def calibrated_grad_scores(model: nn.Module, input_ids: Tensor, response_mask: Tensor,
                           calibration: MeasureCalibration, *, attention_mask: Tensor | None = None,
                           param_patterns: str | Iterable[str] = DEFAULT_PARAM_PATTERNS,
                           check_logits: bool = True) -> Tensor:
    """The calibrated measure of every scored token, ``[B, T]``: one same-position forward and
    backward, then the calibration's weights (:func:`calibrated_scores`)."""
    features = calibration_features(model, input_ids, response_mask, attention_mask=attention_mask,
                                    param_patterns=param_patterns, check_logits=check_logits,
                                    one_hop_values=calibration.one_hop_values)
    return calibrated_scores(features, calibration)


def _feature_matrix(same_per_layer: np.ndarray, attention_entropy: np.ndarray) -> np.ndarray:
    return np.concatenate([np.log(np.maximum(same_per_layer, _TINY)), attention_entropy], axis=1)


def fit_calibration(same_per_layer: Sequence[np.ndarray], attention_entropy: Sequence[np.ndarray],
                    exact: Sequence[np.ndarray], layer_names: Sequence[str], *, ridge: float = 1e-3,
                    one_hop_values: bool = False, model: str = "", fitted_on: str = "") -> MeasureCalibration:
    """Ridge fit of ``log exact`` on the features, within each response (both sides centred on
    the response's mean, so a response's overall scale is not fitted).

    Args:
        same_per_layer: per response, ``[n, L]`` same-position norms per layer (with the one-hop
            value paths when ``one_hop_values``, recorded in the calibration).
        attention_entropy: per response, ``[n, A]`` attention entropies.
        exact: per response, ``[n]`` exact Frobenius norms (positive).
        ridge: penalty ``ridge x (number of tokens)`` on the squared weights.
    """
    if not (len(same_per_layer) == len(attention_entropy) == len(exact)) or not exact:
        raise ValueError("same_per_layer, attention_entropy and exact need one entry per response")
    rows, targets = [], []
    for s, a, e in zip(same_per_layer, attention_entropy, exact):
        e = np.asarray(e, dtype=np.float64)
        if e.ndim != 1 or (e <= 0).any() or not np.isfinite(e).all():
            raise ValueError("exact norms must be finite and positive")
        x = _feature_matrix(np.asarray(s, np.float64), np.asarray(a, np.float64))
        rows.append(x - x.mean(0))
        targets.append(np.log(e) - np.log(e).mean())
    x, y = np.concatenate(rows), np.concatenate(targets)
    weights = np.linalg.solve(x.T @ x + ridge * len(x) * np.eye(x.shape[1]), x.T @ y)
    n_layers = np.asarray(same_per_layer[0]).shape[1]
    return MeasureCalibration(layer_names=tuple(layer_names),
                              same_weights=tuple(map(float, weights[:n_layers])),
                              attention_weights=tuple(map(float, weights[n_layers:])), ridge=ridge,
                              one_hop_values=one_hop_values, model=model, fitted_on=fitted_on)
