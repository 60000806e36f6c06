"""The loss and the jitted train and eval steps.

One loss serves both steps: next-token cross-entropy over the tokens that count, plus the
auxiliary losses the attention variants report, weighted as the variant declares
(`AttentionVariant.aux_losses`, e.g. DSA's indexer KL). A variant with stages (DSA: dense,
then sparse) gets one compiled step per stage (`stage`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def loss_fn(params, graphdef, batch, *, stage: str | None = None, diagnostics: bool = False,
            aux_weights: dict[str, float] | None = None):
    """Mean next-token cross-entropy over the tokens that count (same document as their input).

    Returns (objective, (ce, aux, hit)). `aux` holds the (sum, count) pairs the attention variants
    report, summed over layers; the objective adds weight x sum / count for each name in `aux_weights`.
    `stage` picks the variant's stage, `diagnostics` asks for its extra measurements.
    """
    model = nnx.merge(graphdef, params)
    logits, aux = model(batch["inputs"], batch["positions"], batch["segment_ids"], stage=stage,
                        diagnostics=diagnostics, return_aux=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    n = jnp.maximum(mask.sum(), 1.0)
    lm = (ce * mask).sum() / n
    objective = lm
    for name, weight in (aux_weights or {}).items():
        objective = objective + weight * aux[name][0] / jnp.maximum(aux[name][1], 1.0)
    hit = jnp.argmax(logits, -1) == batch["targets"]  # unused by the train step (XLA drops it there)
    return objective, (ce, aux, hit)


def make_train_step(graphdef, tx, schedule, *, stage: str | None = None, aux_weights: dict[str, float] | None = None,
                    state_shardings=None, skip_nonfinite: bool = False):
    """The jitted, donated step for one `stage` of the attention variant, its objective adding `aux_weights`.

    `state_shardings` (the state's tree of shardings) pins the new state to the layout it came in, so that
    the optimizer state stays sharded like the parameters whatever XLA's propagation would choose.
    `lr_scale` multiplies the update, which for AdamW (decoupled weight decay included) is multiplying the
    learning rate. With `skip_nonfinite`, a step whose objective or gradient norm is not finite keeps the
    parameters and optimizer state it got (metric `skipped` = 1); the step counter still advances.
    """
    def train_step(state, batch, lr_scale=1.0):
        (objective, (ce, aux, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], graphdef, batch, stage=stage, aux_weights=aux_weights)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        updates = jax.tree.map(lambda u: u * jnp.asarray(lr_scale, u.dtype), updates)
        params = optax.apply_updates(state["params"], updates)
        lr = schedule(state["step"] - state["phase_start"]) * lr_scale
        mask = batch["loss_mask"]
        loss = (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr}
        metrics.update({k: v[0] / jnp.maximum(v[1], 1.0) for k, v in aux.items()})
        new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        if skip_nonfinite:
            ok = jnp.isfinite(objective) & jnp.isfinite(grad_norm)
            new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state,
                                     {**state, "step": new_state["step"]})
            metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
        if state_shardings is not None:
            new_state = jax.lax.with_sharding_constraint(new_state, state_shardings)
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef, num_buckets: int, seq_len: int, *, stage: str | None = None):
    """Sum of losses and token counts, overall and per position bucket (positions = context length).

    Ratios come back under "ratios" as (sum, count) pairs: the attention variant's auxiliary values
    and diagnostics (DSA: `dsa_kl`, `dsa_recall`, ...), and with synthetic tasks mixed in
    (`answer_mask` in the batch) the retrieval accuracy (every answer token
    right, teacher-forced), the share of answer tokens right, and the loss on
    the text examples alone.
    """
    width = max(1, math.ceil(seq_len / num_buckets))

    def eval_step(params, batch):
        _, (ce, aux, hit) = loss_fn(params, graphdef, batch, stage=stage, diagnostics=True)
        mask = batch["loss_mask"]
        bucket = jnp.clip(batch["positions"] // width, 0, num_buckets - 1).reshape(-1)
        per_sum = jax.ops.segment_sum((ce * mask).reshape(-1), bucket, num_buckets)
        per_cnt = jax.ops.segment_sum(mask.reshape(-1), bucket, num_buckets)
        ratios = dict(aux)
        if "answer_mask" in batch:
            answer = batch["answer_mask"] > 0
            has_answer = answer.any(-1)
            right = jnp.all(hit | ~answer, -1) & has_answer
            ratios["retrieval_acc"] = jnp.stack([right.sum(), has_answer.sum()]).astype(jnp.float32)
            ratios["retrieval_token_acc"] = jnp.stack([(hit & answer).sum(), answer.sum()]).astype(jnp.float32)
            text = (batch["key_position"][:, 0] < 0)[:, None] * mask
            ratios["text_loss"] = jnp.stack([(ce * text).sum(), text.sum()])
        return {"sum": (ce * mask).sum(), "count": mask.sum(), "bucket_sum": per_sum, "bucket_count": per_cnt,
                "ratios": ratios}

    return jax.jit(eval_step), width
