"""Defence specs and the one Predictor builder the service, the audit and the CLI share."""

from __future__ import annotations

import numpy as np
import pytest

from mlinvert.data import load
from mlinvert.defenses.spec import Defense, build_guards, build_predictor
from mlinvert.errors import ConfigError, RateLimited
from mlinvert.targets import train_target


def test_defense_specs() -> None:
    assert Defense.parse("none") == Defense(name="none", policy="full", rate=None)
    d = Defense.parse("round:2+rate:100/hour")
    assert (d.policy, d.rate, d.slug) == ("round:2", "100/hour", "round_2_rate_100_hour")
    with pytest.raises(ConfigError):
        Defense.parse("round:two")
    with pytest.raises(ConfigError):
        Defense.parse("rate:fast")
    d = Defense.parse("round:2+detect:block")
    assert (d.policy, d.rate, d.detector) == ("round:2", None, "detect:block:100")
    guards = d.guards()
    assert guards.limiter is None and guards.detector is not None
    assert guards.detector.name == "detector"
    both = Defense.parse("detect:40+rate:10/minute").guards()
    assert both.limiter is not None and both.limiter.name == "rate-limit"
    with pytest.raises(ConfigError, match="two detectors"):
        Defense.parse("detect+detect:block")
    with pytest.raises(ConfigError, match="detect"):
        Defense.parse("detect:often")


def test_one_builder_applies_the_policy_and_shares_the_guards_across_models() -> None:
    digits = load("digits", seed=0)
    image = train_target(digits, "softmax", seed=0, quick=True).model
    survey = train_target(load("fair", seed=0), "tree", seed=0, quick=True).model
    guards = build_guards("5/hour", "detect:block")
    a = build_predictor(image, name="a", policy="round:1", guards=guards, clock=lambda: 0.0)
    b = build_predictor(image, name="b", guards=guards, clock=lambda: 0.0)
    tree = build_predictor(survey, name="tree", guards=guards)
    assert [g.name for g in a.guards] == ["rate-limit", "detector"]
    # the survey tree gets the shared rate limit but no pixel-window detector
    assert [g.name for g in tree.guards] == ["rate-limit"]
    x = digits.test()[0][:3]
    probs = a.predict(x, account="k").probs
    assert probs is not None and np.allclose(probs * 10, np.round(probs * 10))
    assert a.info.score_step == pytest.approx(0.1) and b.info.score_step == 0.0
    b.predict(x[:2], account="k")  # 3 + 2 of the account's 5 inputs, across both models
    with pytest.raises(RateLimited):
        b.predict(x[:1], account="k")
    with pytest.raises(ConfigError):
        build_predictor(image, name="c", policy="round:x")
