"""Refits held out and folded by prompt, and the head's ridge strength chosen on held-out prompts
(clear_core.length_model), on synthetic traffic where the same prompts come back again and again."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import stats

from clear_core.calibration import fit_calibration
from clear_core.censored import censored_log_likelihood, fit_censored_ridge
from clear_core.errors import InvalidInputError
from clear_core.length_model import (
    ALPHA_MULTIPLES,
    LengthModel,
    chosen_alpha,
    gain_z,
    held_out_groups,
    prompt_group,
    prompt_group_of,
    validated_refit,
)

K = 24


def repeated_prompts(seed, prompts, repeats, shift=0.0, noise=0.4, own=0.6):
    """``prompts`` distinct prompts each asked ``repeats`` times. Log length: linear in the features, plus each
    prompt's own effect the features do not show (spread ``own``), plus noise drawn anew on each ask
    (``noise``); ``shift`` moves the truth's weights away from the prior's (0: the prior is right). A head
    refitted on the repeats can memorise the prompts' own effects; a new prompt shows them as error."""
    rng = np.random.default_rng(seed)
    beta = rng.normal(0, 0.15, K)
    truth = beta + shift * rng.normal(0, 0.3, K)
    px = rng.normal(size=(prompts, K))
    which = np.repeat(np.arange(prompts), repeats)
    rng.shuffle(which)
    x = px[which]
    effect = rng.normal(0, own, prompts)[which]
    tokens = np.maximum(np.round(np.exp(x @ truth + 5.5 + effect + rng.normal(0, noise, which.size))), 1.0)
    caps = np.full(which.size, 8192.0)
    raw = np.exp(px @ beta + 5.5)
    cal = fit_calibration(raw, raw * np.exp(rng.normal(0, np.hypot(noise, own), prompts)), bins=4)
    return x, tokens, caps, np.ones(which.size, dtype=bool), which.astype(np.int64), LengthModel(beta, 5.5, cal)


def split(x, tokens, caps, fin, groups, share):
    """(train, held, held-out mask): the observations of a ``share`` of the prompts held out."""
    held = held_out_groups(groups, share)
    part = lambda m: (x[m], tokens[m], caps[m], fin[m])  # noqa: E731
    return part(~held), part(held), held


def test_prompt_groups_follow_the_sha256_of_the_prompt():
    digest = hashlib.sha256("Write a function that adds two numbers.".encode()).hexdigest()
    assert prompt_group(digest) == int(digest[:16], 16) >> 1
    assert prompt_group_of("Write a function that adds two numbers.") == prompt_group(digest)
    assert 0 <= prompt_group(digest) < 2 ** 63


def test_a_prompt_is_always_on_one_side_and_the_share_is_held():
    groups = np.repeat(np.arange(5000), 3)
    held = held_out_groups(groups, 0.2)
    assert np.all(held.reshape(-1, 3).min(axis=1) == held.reshape(-1, 3).max(axis=1))  # whole prompts
    assert abs(held.mean() - 0.2) < 0.02  # consecutive keys are scrambled, not taken in order
    assert np.array_equal(held_out_groups(groups[::-1], 0.2), held[::-1])  # the key decides, not the position
    with pytest.raises(InvalidInputError):
        held_out_groups(groups, 1.0)


def test_the_chosen_alpha_is_the_brute_force_best_held_out_fit():
    x, tokens, caps, fin, groups, prior = repeated_prompts(0, 60, 5, shift=1.0)
    train, test, held = split(x, tokens, caps, fin, groups, 0.25)
    best, scores = chosen_alpha(prior, train, test, alpha=2.0)
    brute = {}
    for m in ALPHA_MULTIPLES:  # each fit by hand, scored on the held-out prompts with its own spread
        fit = fit_censored_ridge(x[~held], np.log(tokens[~held]), ~fin[~held], prior_coef=prior.coef,
                                 prior_intercept=prior.intercept, alpha=2.0 * m)
        brute[2.0 * m] = float(np.mean(censored_log_likelihood(x[held], np.log(tokens[held]), ~fin[held], fit.coef,
                                                               fit.intercept, fit.sigma)))
    assert scores == pytest.approx(brute, abs=1e-9)
    assert best == max(brute, key=brute.get)


def test_repeated_prompts_choose_a_strong_pull_when_the_prior_is_right_and_a_weak_one_when_it_is_wrong():
    chosen = {}
    for shift in (0.0, 3.0):
        x, tokens, caps, fin, groups, prior = repeated_prompts(1, 80, 8, shift=shift)
        train, test, _ = split(x, tokens, caps, fin, groups, 0.2)
        chosen[shift], _ = chosen_alpha(prior, train, test, alpha=1.0)
    assert chosen[0.0] == max(ALPHA_MULTIPLES)  # 80 prompts asked 8 times: only the prior generalises
    assert chosen[3.0] < chosen[0.0]


def test_out_of_fold_predictions_by_prompt_keep_the_spread_a_new_prompt_will_see():
    # Every prompt asked 8 times: folds of single observations put a prompt's repeats in the fitting folds,
    # its out-of-fold residuals are in-sample ones and the calibrated spread narrows; folds of whole prompts
    # do not.
    x, tokens, caps, fin, groups, prior = repeated_prompts(2, 60, 8, shift=1.0)
    by_row = prior.refitted(x, tokens, caps, fin, prior=prior, alpha=0.05)
    by_prompt = prior.refitted(x, tokens, caps, fin, prior=prior, alpha=0.05, groups=groups)
    fresh_x, fresh_tokens = repeated_prompts(2, 400, 1, shift=1.0)[:2]
    # the spread a prompt never seen shows: the residual of the head fitted on all of them
    resid_sd = float(np.std(np.log(fresh_tokens) - by_prompt.raw_log(fresh_x)))
    narrow = float(np.median(by_row.calibration.log_sigma))
    honest = float(np.median(by_prompt.calibration.log_sigma))
    assert honest > narrow + 0.05
    assert abs(honest - resid_sd) < abs(narrow - resid_sd)


def test_a_refit_on_repeats_of_the_priors_own_traffic_keeps_the_prior_and_one_on_other_traffic_publishes():
    outcome = {}
    for shift in (0.0, 3.0):
        x, tokens, caps, fin, groups, prior = repeated_prompts(3, 80, 8, shift=shift)
        train, test, held = split(x, tokens, caps, fin, groups, 0.2)
        decision = validated_refit(prior, prior, train, test, alpha=8.0, train_groups=groups[~held],
                                   held_groups=groups[held])
        outcome[shift] = decision.outcome
        if shift == 0.0:
            assert decision.alpha == 8.0 * max(ALPHA_MULTIPLES)
            assert decision.model is prior  # a held-out gain within noise replaces nothing
        else:
            assert decision.model.version == 1
            assert decision.heldout_log_likelihood["candidate"] > decision.heldout_log_likelihood["prior"] + 0.5
    assert outcome == {0.0: "kept", 3.0: "published"}


def test_the_gain_z_is_the_one_sample_t_statistic_and_counts_a_prompt_once():
    rng = np.random.default_rng(4)
    better, worse = rng.normal(0.1, 1.0, 300), rng.normal(0.0, 1.0, 300)
    t = stats.ttest_1samp(better - worse, 0.0).statistic
    assert gain_z(better, worse) == pytest.approx(t, rel=1e-9)
    # every observation asked again, each prompt its own group: the same evidence, the same z
    groups = np.arange(300)
    twice = gain_z(np.repeat(better, 2), np.repeat(worse, 2), np.repeat(groups, 2))
    assert twice == pytest.approx(t, rel=1e-9)
    assert gain_z(np.repeat(better, 2), np.repeat(worse, 2)) > 1.3 * t  # counted as new prompts: overconfident
    assert gain_z([1.0, 2.0], [0.0, 1.0]) == float("inf") and gain_z([], []) == 0.0
