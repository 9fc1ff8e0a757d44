"""CorR-PO inside a real TRL GRPOTrainer run, and the opt-in entropy_gpu log-prob path.

The trainer runs for real (tiny random Llama, the SmolLM2 tokenizer read from the bundled
GGUF, CPU). Every generation batch is recorded with a snapshot of the weights that sampled
it; the advantages TRL optimizes are then recomputed independently: full logits from the
snapshot, float64 entropy and nll_grad_norm, a numpy Pearson, the reward functions
re-evaluated on the completion ids, and GRPO's group normalization.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from entropy_gpu.analysis.models import load_tokenizer, tiny_llama
from entropy_gpu.corrpo.reward import CorrPOConfig
from entropy_gpu.integrations.trl import CorrPOTrainer, use_entropy_gpu_logprobs
from tests.reference import reference_stats

EXCLAMATION, EOS = 17, 2  # SmolLM2 token ids of "!" and <|im_end|>
COEF = 0.7
WEIGHTS = (1.0, 0.5)


def length_reward(completion_ids, **kwargs):
    return [len(ids) / 8 for ids in completion_ids]


def first_token_reward(completion_ids, **kwargs):
    return [(ids[0] % 7) / 7 for ids in completion_ids]


def peaked_tiny_llama(vocab_size: int):
    """Tiny random Llama whose next-token distributions are far from uniform (the default
    init gives entropies within 1e-5 of log V, so correlations would be rounding noise)."""
    model = tiny_llama(vocab_size=vocab_size, hidden_size=32, layers=1, heads=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(12.0)  # tied: the input embedding too (RMS-normed)
    return model


class RecordingTrainer(CorrPOTrainer):
    """Keeps each scored generation batch with the weights that sampled it."""

    def _generate_and_score_completions(self, inputs):
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        out = super()._generate_and_score_completions(inputs)
        self.records.append((weights, out))
        return out


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _pearson64(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = (dx * dx).sum(), (dy * dy).sum()
    return float((dx * dy).sum() / math.sqrt(sxx * syy)) if sxx > 0 and syy > 0 else math.nan


def _expected_advantages(model_config, weights, out, temperature, group_size):
    """Independent recomputation: full logits -> float64 stats -> Pearson -> rewards -> advantages."""
    model = tiny_llama(vocab_size=model_config.vocab_size, hidden_size=model_config.hidden_size,
                       layers=model_config.num_hidden_layers, heads=model_config.num_attention_heads)
    model.load_state_dict(weights)
    prompt_ids, completion_ids = out["prompt_ids"], out["completion_ids"]
    mask = out["completion_mask"].bool()
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        # every position, no logits_to_keep
        logits = model(input_ids=input_ids, attention_mask=attention).logits
    c = completion_ids.size(1)
    ref = reference_stats(logits[:, -c - 1:-1], completion_ids, temperature=temperature)
    terms, task_rewards, log_probs = [], [], ref["logprob"]
    for i in range(len(completion_ids)):
        ids = completion_ids[i][mask[i]].tolist()
        rho = _pearson64(ref["entropy"][i][mask[i]].numpy(), ref["nll_grad_norm"][i][mask[i]].numpy())
        terms.append(0.0 if math.isnan(rho) else -rho)
        task_rewards.append(WEIGHTS[0] * length_reward([ids])[0] + WEIGHTS[1] * first_token_reward([ids])[0])
    terms, task_rewards = np.array(terms), np.array(task_rewards)
    rewards = (task_rewards + COEF * terms).reshape(-1, group_size)
    adv = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + 1e-4)
    plain = task_rewards.reshape(-1, group_size)
    adv_without = (plain - plain.mean(1, keepdims=True)) / (plain.std(1, ddof=1, keepdims=True) + 1e-4)
    return adv.reshape(-1), adv_without.reshape(-1), terms, log_probs, ref["entropy_change"]


def _expected_entropy_change_metrics(entropy_change, advantages, mask) -> dict[str, float]:
    """numpy: ``A * entropy_change`` over the completion tokens (float64 reference values)."""
    a = np.broadcast_to(np.asarray(advantages, dtype=np.float64)[:, None], mask.shape)
    predicted = (a * entropy_change.numpy())[mask.numpy()]
    return {"entropy_change/adv_weighted_mean": predicted.mean(),
            "entropy_change/frac_pushing_down": (predicted < 0).mean(),
            **{f"entropy_change/q{q}": np.quantile(predicted, q / 100) for q in (10, 50, 90)},
            "entropy_change/tokens": float(predicted.size)}


@pytest.mark.parametrize("num_iterations", [1, 2], ids=["added-forward", "reuses-old-logps-pass"])
def test_grpo_run_optimizes_rewards_with_correlation_term(tokenizer, tmp_path, num_iterations):
    model = peaked_tiny_llama(len(tokenizer))
    # "Say nothing!" ends in "!", and the sequence bias makes "<|im_end|>" follow "!": that
    # prompt's completions are one token long, so their correlation is undefined.
    dataset = Dataset.from_dict({"prompt": ["Say nothing!", "Tell a story"]})  # both in every batch
    args = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_generations=4, max_completion_length=6, max_steps=2, num_iterations=num_iterations,
        temperature=0.9, learning_rate=1e-2, reward_weights=list(WEIGHTS), logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, seed=0,
        generation_kwargs={"sequence_bias": [[[EXCLAMATION, EOS], 100.0]]},
        bf16=False,  # GRPOConfig defaults to bf16 autocast, even on CPU; compare in fp32
    )
    trainer = RecordingTrainer(model=model, reward_funcs=[length_reward, first_token_reward], args=args,
                               train_dataset=dataset, processing_class=tokenizer,
                               corrpo=CorrPOConfig(coef=COEF, measure="nll_grad_norm"))
    trainer.records = []
    trainer.train()

    assert trainer.state.global_step == 2
    assert len(trainer.records) >= 2 if num_iterations == 1 else len(trainer.records) >= 1
    undefined_seen = 0
    logs = [h for h in trainer.state.log_history if "corrpo/correlation" in h]
    assert len(logs) == len(trainer.records)  # one entry per generation batch
    for (weights, out), log in zip(trainer.records, logs):
        expected, without_term, terms, ref_logps, ref_change = _expected_advantages(
            model.config, weights, out, args.temperature, args.num_generations)
        # The entropy dynamics of the batch, from the CorR-PO pass and TRL's advantages.
        dynamics = _expected_entropy_change_metrics(ref_change, out["advantages"].double(),
                                                    out["completion_mask"].bool())
        assert dynamics["entropy_change/frac_pushing_down"] not in (0.0, 1.0)  # both signs occur
        for key, value in dynamics.items():
            assert log[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
        got = out["advantages"].double().numpy()
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
        assert np.abs(expected - without_term).max() > 0.05, "the correlation term must change the advantages"
        lengths = out["completion_mask"].sum(1)
        undefined_seen += int((lengths < 2).sum())
        assert (terms[(lengths < 2).numpy()] == 0).all()
        if num_iterations > 1:  # TRL's old-policy log-probs came from the CorR-PO pass: still exact
            mask = out["completion_mask"].bool()
            torch.testing.assert_close(out["old_per_token_logps"][mask].double(), ref_logps[mask],
                                       atol=1e-4, rtol=0)
    assert undefined_seen > 0

    for h in logs:
        for key in ("corrpo/inversion_rate", "corrpo/entropy", "corrpo/nll_grad_norm", "rewards/corrpo/mean"):
            assert math.isfinite(h[key]), key
        assert h["corrpo/undefined"] > 0
        assert h["corrpo/extra_forward"] == (1.0 if num_iterations == 1 else 0.0)


def _plain_trainer(tokenizer, tmp_path, temperature=0.8, entropy_coef=0.0):
    model = peaked_tiny_llama(len(tokenizer))
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      temperature=temperature, entropy_coef=entropy_coef, report_to=[], use_cpu=True,
                      save_strategy="no", bf16=False)
    dataset = Dataset.from_dict({"prompt": ["a", "b"]})
    return GRPOTrainer(model=model, reward_funcs=length_reward, args=args, train_dataset=dataset,
                       processing_class=tokenizer)


def _scoring_inputs(vocab: int, prompt_len: int = 5, completion_len: int = 7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (4, prompt_len + completion_len), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left-padded prompt
    mask[1, -3:] = 0  # right-padded completion
    return ids, mask, completion_len


@pytest.mark.parametrize("entropy_coef", [0.0, 0.5], ids=["no-entropy-bonus", "entropy-bonus"])
def test_entropy_gpu_logprobs_equal_trl_within_tolerance(tokenizer, tmp_path, entropy_coef):
    trainer = _plain_trainer(tokenizer, tmp_path, entropy_coef=entropy_coef)
    model = trainer.model
    ids, mask, keep = _scoring_inputs(len(tokenizer))
    completion = mask[:, -keep:].bool()

    def scoring_call():
        with torch.no_grad():
            return trainer._get_per_token_logps_and_entropies(model, ids, mask, keep, batch_size=3,
                                                              compute_entropy=True)

    def training_call():  # what the loss differentiates: log-probs, plus the entropy bonus when enabled
        model.zero_grad()
        logps, ent, _ = trainer._get_per_token_logps_and_entropies(model, ids, mask, keep,
                                                                   compute_entropy=True)
        loss = (logps * completion).sum() + entropy_coef * (ent * completion).sum()
        loss.backward()
        return logps.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]

    trl_scored, trl_trained = scoring_call(), training_call()
    assert use_entropy_gpu_logprobs(trainer) is trainer
    scored, trained = scoring_call(), training_call()
    for got, want in zip(scored[:2], trl_scored[:2]):  # no grad: log-probs, entropies
        torch.testing.assert_close(got[completion], want[completion], atol=1e-5, rtol=1e-5)
    assert (scored[0][~completion] == 0).all()
    for got, want in zip(trained[:2], trl_trained[:2]):  # with grad
        torch.testing.assert_close(got[completion], want[completion], atol=1e-5, rtol=1e-5)
    for got, want in zip(trained[2], trl_trained[2]):  # parameter gradients
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert trained[2][0].abs().sum() > 0


def test_entropy_gpu_logprobs_are_the_float64_values(tokenizer, tmp_path):
    """Independent of TRL: the patched scoring call against a float64 reference from full logits."""
    trainer = use_entropy_gpu_logprobs(_plain_trainer(tokenizer, tmp_path, temperature=0.6))
    ids, mask, keep = _scoring_inputs(len(tokenizer))
    with torch.no_grad():
        logps, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep,
                                                                   compute_entropy=True)
        logits = trainer.model(input_ids=ids, attention_mask=mask).logits[:, -keep - 1:-1]
    ref = reference_stats(logits, ids[:, -keep:], temperature=0.6)
    completion = mask[:, -keep:].bool()
    torch.testing.assert_close(logps[completion].double(), ref["logprob"][completion], atol=1e-4, rtol=0)
    torch.testing.assert_close(ent[completion].double(), ref["entropy"][completion], atol=1e-4, rtol=0)


def _group_pooled_rho(entropy: list[np.ndarray], measure: list[np.ndarray]) -> np.ndarray:
    """Float64 reference of pooling="group" for one group: z-scores with the pooled moments."""
    x, y = np.concatenate(entropy), np.concatenate(measure)
    return np.array([((h - x.mean()) * (g - y.mean())).mean() / (x.std() * y.std())
                     for h, g in zip(entropy, measure)])


@pytest.mark.distributed
def test_two_process_run_pools_groups_across_ranks(tmp_path):
    """2 ranks (gloo), every GRPO group split between them, group pooling: the corrpo column
    each rank hands TRL, and the advantages, match a float64 recomputation on the joined batch."""
    worker = Path(__file__).with_name("corrpo_dist_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2",
                           str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert len(ranks[0]["records"]) == len(ranks[1]["records"]) == 1
    for records in zip(ranks[0]["records"], ranks[1]["records"]):
        weights = records[0]["weights"]
        model = tiny_llama(vocab_size=len(weights["model.embed_tokens.weight"]), hidden_size=32, layers=1,
                           heads=2)
        model.load_state_dict(weights)
        entropy, measure, lengths, prompts = [], [], [], []
        for rec in records:  # TRL's global order: rank 0's rows, then rank 1's
            ids = torch.cat([rec["prompt_ids"], rec["completion_ids"]], 1)
            attention = torch.cat([rec["prompt_mask"], rec["completion_mask"]], 1)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=attention).logits
            c = rec["completion_ids"].size(1)
            ref = reference_stats(logits[:, -c - 1:-1], rec["completion_ids"], temperature=0.9)
            for i, row_mask in enumerate(rec["completion_mask"].bool()):
                entropy.append(ref["entropy"][i][row_mask].numpy())
                measure.append(ref["nll_grad_norm"][i][row_mask].numpy())
                lengths.append(int(row_mask.sum()))
                prompts.append(tuple(rec["prompt_ids"][i][rec["prompt_mask"][i].bool()].tolist()))
        assert len(set(prompts)) == 1, "one GRPO group of 4, split 2 + 2 over the ranks"
        term = -_group_pooled_rho(entropy, measure)
        got = torch.cat([rec["corrpo"] for rec in records]).double().numpy()
        np.testing.assert_allclose(got, term, atol=1e-4)
        rewards = np.array(lengths) / 5 + 0.5 * term
        advantages = (rewards - rewards.mean()) / (rewards.std(ddof=1) + 1e-4)
        got_adv = torch.cat([rec["advantages"] for rec in records]).double().numpy()
        np.testing.assert_allclose(got_adv, advantages, atol=1e-4, rtol=1e-4)
    assert any("corrpo/correlation" in h for h in ranks[0]["logs"])


@pytest.mark.parametrize("method", ["forward_mode", "same_position"])
def test_grpo_run_with_the_papers_measure(tokenizer, tmp_path, method):
    """CorrPOTrainer with the parameter-gradient measure: the corrpo column TRL receives equals
    corrpo_from_model on the weights that sampled the batch (an independent padded layout:
    prompt and completion laid out from TRL's scored batch), and CorR-PO's state is one object."""
    from entropy_gpu.corrpo import ParamGradMeasure, corrpo_from_model

    model = peaked_tiny_llama(len(tokenizer))
    spec = ParamGradMeasure(method=method, k=4, seed=1, directions_per_pass=2)
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=1, temperature=0.9, report_to=[], save_strategy="no",
                      use_cpu=True, seed=0, bf16=False, logging_steps=1)

    class Recording(RecordingTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.terms.append(self.corrpo_reward.last_term.clone())
            return out

    trainer = Recording(model=model, reward_funcs=[length_reward], args=args, processing_class=tokenizer,
                        train_dataset=Dataset.from_dict({"prompt": ["Tell a story", "Name a color"]}),
                        corrpo=CorrPOConfig(coef=0.5, measure=spec))
    trainer.records, trainer.terms = [], []
    trainer.train()
    assert trainer.corrpo_reward in trainer.reward_funcs
    for (weights, out), term in zip(trainer.records, trainer.terms):
        snapshot = peaked_tiny_llama(len(tokenizer))
        snapshot.load_state_dict(weights)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        completion = torch.cat([torch.zeros_like(out["prompt_mask"]), out["completion_mask"]], 1)
        want = corrpo_from_model(snapshot, ids, completion, attention_mask=attention, group_size=4,
                                 config=CorrPOConfig(coef=0.5, measure=spec), temperature=0.9)
        torch.testing.assert_close(term, want.term, atol=1e-4, rtol=1e-4)
        assert want.valid.any()
    logs = [h for h in trainer.state.log_history if "corrpo/param_grad_fro" in h]
    assert logs and all(h["corrpo/extra_forward"] == 1.0 for h in logs)
    # entropy_change came from the same passes as the entropy (completion_stats): float64 check.
    (weights, out), log = trainer.records[0], logs[0]
    snapshot = peaked_tiny_llama(len(tokenizer))
    snapshot.load_state_dict(weights)
    c = out["completion_ids"].size(1)
    with torch.no_grad():
        logits = snapshot(input_ids=torch.cat([out["prompt_ids"], out["completion_ids"]], 1),
                          attention_mask=torch.cat([out["prompt_mask"], out["completion_mask"]], 1)).logits
    ref = reference_stats(logits[:, -c - 1:-1], out["completion_ids"], temperature=0.9)
    dynamics = _expected_entropy_change_metrics(ref["entropy_change"], out["advantages"].double(),
                                                out["completion_mask"].bool())
    for key, value in dynamics.items():
        assert log[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
