"""Combining task losses: Kendall uncertainty weighting, static weights, Dynamic Weight Average.

Every method returns `(total, metrics)` with `weights/<task>` = the multiplier applied to that
task's loss this step (DESIGN.md §5 metric names).

Kendall et al. 2018, with learned `s_i = log σ_i²` clamped to [s_min, s_max]:
- regression form      0.5·exp(−s)·L + 0.5·s   (Gaussian likelihood; the paper's Eq. 2 for all)
- classification form      exp(−s)·L + 0.5·s   (softmax with a learned temperature)
`DEFAULT_FORMS` says which task uses which: the text (KD + CE) and spatial-relation losses are
softmax likelihoods → classification; depth and detection are dominated by regression terms
(L1 depth; L1 box + GIoU carry 7 of the 9 default detection weight) → regression, as are the
grounding, object and camera losses (L1 attributes, positions and pose encodings).
The clamp's gradient passes whenever it points back into the range (gradient descent moving s
inwards), so an `s` pushed past a bound can return; a plain clip would freeze it there.

DWA (Liu et al. 2019): w_i = K·softmax_i(r_i / T), r_i = L_i(t−1) / L_i(t−2), K tasks; weights are
1 until two past values exist. The history is a small `DWAState` the caller carries; it is updated
from whatever the caller passes (per-step losses, or epoch means at epoch ends).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

FORMS = ("regression", "classification")
DEFAULT_FORMS = {"text": "classification", "relations": "classification",
                 "depth": "regression", "det": "regression", "ground": "regression",
                 "objects": "regression", "camera": "regression"}


def _check_tasks(where: str, losses: Mapping, table: Mapping, table_name: str) -> None:
    missing = sorted(set(losses) - set(table))
    if missing:
        raise ValueError(f"{where}: tasks {missing} have a loss but no entry in {table_name} "
                         f"(which has {sorted(table)}); add them to the config")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def clamp_log_var(s: jax.Array, s_min: float, s_max: float) -> jax.Array:
    """clip(s, s_min, s_max); outside the range only gradients pointing back inside pass."""
    return jnp.clip(s, s_min, s_max)


def _clamp_fwd(s, s_min, s_max):
    return jnp.clip(s, s_min, s_max), s


def _clamp_bwd(s_min, s_max, s, g):
    # Descent moves s by −g: above the range it must have g > 0 to come back, below g < 0.
    outward = ((s > s_max) & (g < 0)) | ((s < s_min) & (g > 0))
    return (jnp.where(outward, 0.0, g),)


clamp_log_var.defvjp(_clamp_fwd, _clamp_bwd)


def kendall(losses: Mapping[str, jax.Array], log_vars: Mapping[str, jax.Array], *,
            forms: Mapping[str, str], s_min: float, s_max: float):
    """Σ_i form_i(L_i, clamp(s_i)). `losses`, `log_vars`: task → scalar; `forms`: task → form."""
    if not s_min < s_max:
        raise ValueError(f"kendall: s_min = {s_min}, s_max = {s_max}: need s_min < s_max")
    _check_tasks("kendall", losses, log_vars, "log_vars")
    _check_tasks("kendall", losses, forms, "forms")
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for task in sorted(losses):
        form = forms[task]
        if form not in FORMS:
            raise ValueError(f"kendall: forms[{task!r}] = {form!r}: must be one of {FORMS}")
        s = clamp_log_var(jnp.asarray(log_vars[task], jnp.float32), s_min, s_max)
        weight = jnp.exp(-s) * (0.5 if form == "regression" else 1.0)
        total = total + weight * losses[task] + 0.5 * s
        metrics[f"weights/{task}"] = jax.lax.stop_gradient(weight)
    return total, metrics


class KendallWeights(nnx.Module):
    """Learned log-variances, one per task, in the train state next to the model.

    `log_vars`: `[num_tasks]` (tasks in sorted order, `self.tasks`), replicated.
    """

    def __init__(self, forms: Mapping[str, str], *, s_min: float, s_max: float,
                 init: float = 0.0):
        if not forms:
            raise ValueError("KendallWeights: forms is empty; give each task's form "
                             f"(e.g. {DEFAULT_FORMS})")
        self.tasks = tuple(sorted(forms))
        self.forms = dict(forms)
        self.s_min, self.s_max = float(s_min), float(s_max)
        self.log_vars = nnx.Param(jnp.full((len(self.tasks),), init, jnp.float32),
                                  out_sharding=(None,))

    def __call__(self, losses: Mapping[str, jax.Array]):
        s = self.log_vars[...]
        return kendall(losses, {t: s[i] for i, t in enumerate(self.tasks)}, forms=self.forms,
                       s_min=self.s_min, s_max=self.s_max)


def static(losses: Mapping[str, jax.Array], weights: Mapping[str, float]):
    """Σ_i w_i·L_i with fixed weights (the paper's ablation)."""
    _check_tasks("static", losses, weights, "weights")
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for task in sorted(losses):
        w = jnp.asarray(weights[task], jnp.float32)
        total = total + w * losses[task]
        metrics[f"weights/{task}"] = w
    return total, metrics


class DWAState(NamedTuple):
    """Loss history for DWA: task → scalar at t−1 and t−2, and how many values were recorded."""

    last: dict[str, jax.Array]
    before_last: dict[str, jax.Array]
    count: jax.Array


def dwa_init(tasks: Sequence[str]) -> DWAState:
    zeros = {t: jnp.zeros((), jnp.float32) for t in tasks}
    return DWAState(last=zeros, before_last=dict(zeros), count=jnp.zeros((), jnp.int32))


def dwa_weights(state: DWAState, *, temperature: float = 2.0) -> dict[str, jax.Array]:
    """task → K·softmax(r / T); all ones until two losses are recorded."""
    if temperature <= 0:
        raise ValueError(f"dwa: temperature = {temperature}: must be > 0")
    tasks = sorted(state.last)
    ratio = jnp.stack([state.last[t] / jnp.maximum(state.before_last[t], 1e-12) for t in tasks])
    w = len(tasks) * jax.nn.softmax(ratio / temperature)
    w = jnp.where(state.count >= 2, w, 1.0)
    return {t: w[i] for i, t in enumerate(tasks)}


def dwa_update(state: DWAState, losses: Mapping[str, jax.Array]) -> DWAState:
    """Shifts the history by one, recording `losses` (no gradient) as the newest values."""
    _check_tasks("dwa_update", state.last, losses, "losses")
    new = {t: jax.lax.stop_gradient(jnp.asarray(losses[t], jnp.float32)) for t in state.last}
    return DWAState(last=new, before_last=dict(state.last), count=state.count + 1)


def dwa(losses: Mapping[str, jax.Array], state: DWAState, *, temperature: float = 2.0):
    """Weights from the history *before* this step; returns (total, metrics, updated state)."""
    _check_tasks("dwa", losses, state.last, "the DWA state (dwa_init(tasks))")
    weights = dwa_weights(state, temperature=temperature)
    total = jnp.zeros((), jnp.float32)
    for task in sorted(losses):
        total = total + weights[task] * losses[task]
    metrics = {f"weights/{t}": jax.lax.stop_gradient(weights[t]) for t in sorted(losses)}
    return total, metrics, dwa_update(state, losses)
