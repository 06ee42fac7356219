"""``--attack fast``: APGD-CE then APGD-T on the examples still standing (issue 23)."""

from __future__ import annotations

import pytest
import torch

from robust_amo.errors import ConfigError
from robust_amo.evaluation import evaluate_attacks, parse_attack
from robust_amo.evaluation.fast_eval import FastSettings
from robust_amo.evaluation.report import build_report, markdown
from tests.evaluation.test_passes import _data, _tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_passes_equal_a_hand_count_when_nothing_breaks():
    """At eps = 0 no example can break, so every stage runs all its iterations: 2·B clean
    forwards (the second for the randomized-model check; the first also ranks the targets),
    then per stage a·(N + 1) forwards and a·N backwards, with a the clean-correct examples."""
    model = _tiny(1)
    x, _ = _data(12)
    y = model(x).argmax(1).detach()
    y[::4] = (y[::4] + 1) % 10  # three misclassified: not attacked
    out = evaluate_attacks(model, x, y, [parse_attack("fast-t2", eps=0.0)], batch_size=12)[0]
    a, n, stages = 9, 100, 3
    assert (out.forward_passes, out.backward_passes) == (2 * 12 + stages * a * (n + 1),
                                                         stages * a * n)
    assert int(out.robust.sum()) == a and out.warnings == []


def test_malt_ranking_adds_one_forward_and_a_backward_per_class_to_the_hand_count():
    """As above with -malt: the targets are ranked by one forward and C = 10 backward passes of
    the a clean-correct examples; -x0 adds one stage."""
    model = _tiny(1)
    x, _ = _data(12)
    y = model(x).argmax(1).detach()
    y[::4] = (y[::4] + 1) % 10
    out = evaluate_attacks(model, x, y, [parse_attack("fast-t2-malt", eps=0.0)],
                           batch_size=12)[0]
    a, n, stages = 9, 100, 3
    assert (out.forward_passes, out.backward_passes) == (2 * 12 + a + stages * a * (n + 1),
                                                         10 * a + stages * a * n)
    out = evaluate_attacks(model, x, y, [parse_attack("fast-t2-malt-x0", eps=0.0)],
                           batch_size=12)[0]
    stages = 4  # -x0: the first target once more, from the clean input
    assert (out.forward_passes, out.backward_passes) == (2 * 12 + a + stages * a * (n + 1),
                                                         10 * a + stages * a * n)
    assert list(out.steps) == ["apgd-ce", "apgd-t1", "apgd-t2", "apgd-t1-x0"]


def test_stages_narrow_and_the_report_names_the_cascade():
    model = _tiny(2)
    x, y = _data(24, seed=3)
    y = model(x).argmax(1).detach()
    attack = parse_attack("fast-t3-malt-x0", eps=0.02)
    out = evaluate_attacks(model, x, y, [attack], batch_size=24)[0]
    names = ["apgd-ce", "apgd-t1", "apgd-t2", "apgd-t3", "apgd-t1-x0"]
    assert list(out.steps) == names
    masks = [out.steps[k] for k in names]
    assert all((b <= a).all() for a, b in zip(masks, masks[1:], strict=False))
    assert torch.equal(masks[-1], out.robust) and (out.robust <= out.clean).all()
    assert 0 < int(out.robust.sum()) < int(masks[0].sum()), "targets break what CE left here"
    report = build_report(outcomes=[out], model_meta={"arch": "tiny-mlp"}, dataset="x",
                          split="test", norm="linf", eps=0.02, seed=0, device="cpu",
                          bf16=False, wall_time_s=1.0, checks=[])
    assert ("APGD-CE, then APGD-T towards 3 targets (nearest linearised boundary first, MALT), "
            "then the first again from the clean input" in markdown(report))


def test_names_and_refusals():
    assert parse_attack("fast", eps=0.1).settings()["targets"] == 3
    assert parse_attack("fast-t9", eps=0.1).settings()["targets"] == 9
    assert parse_attack("fast", eps=0.1).settings() == parse_attack("fast-t3", eps=0.1).settings()
    assert parse_attack("fast-t3", eps=0.1).settings()["rank"] == "logits"
    assert parse_attack("fast-t2-malt", eps=0.1).settings() == {
        "eps": 0.1, "steps": 100, "targets": 2, "seed": 0, "rank": "malt",
        "clean_start": False}
    assert parse_attack("fast-x0", eps=0.1).settings()["clean_start"]
    with pytest.raises(ConfigError, match="rank"):
        FastSettings(0.1, rank="nearest")
    with pytest.raises(ConfigError, match="L-inf only"):
        parse_attack("fast", eps=0.5, norm="l2")
    with pytest.raises(ConfigError, match="at least one target"):
        parse_attack("fast-t0", eps=0.1)


def test_the_clean_start_stage_starts_at_the_input_and_attacks_only_survivors():
    """-x0's stage is APGD-T towards the first target from x itself: on the examples the
    cascade left standing it equals that attack run alone with x_init = x."""
    from robust_amo.attacks import APGD, top_targets
    from robust_amo.evaluation.fast_eval import fast_robust

    model = _tiny(2)
    x, _ = _data(24, seed=3)
    y = model(x).argmax(1).detach()
    plain = fast_robust(model, x, y, torch.arange(24), FastSettings(0.02, targets=1))
    both = fast_robust(model, x, y, torch.arange(24),
                       FastSettings(0.02, targets=1, clean_start=True))
    assert torch.equal(both.after_stage[1], plain.robust)
    left = plain.robust.nonzero().squeeze(1)
    assert left.numel() > 0
    tt = APGD(model, eps=0.02, steps=100, loss="dlr-t")
    tt.target = top_targets(model(x[left]), y[left], 1)[:, 0]
    tt.x_init = x[left]
    tt(x[left], y[left])
    want = plain.robust.clone()
    want[left] = ~tt.last_fooled
    assert torch.equal(both.robust, want) and torch.equal(both.after_stage[2], want)


def test_the_checks_flag_a_randomized_model_probabilities_zero_gradients_and_few_classes():
    from robust_amo.evaluation.fast_eval import model_checks

    model = _tiny(1)
    x, _ = _data(12)
    y = model(x).argmax(1).detach()
    z = model(x).detach()
    assert model_checks(z, z.clone(), y) == []
    assert "randomized" in model_checks(z, z + 1e-2 * torch.randn_like(z), y)[0]
    assert "probability" in model_checks(z.softmax(1), z.softmax(1), y)[0]

    class Flat(torch.nn.Module):  # a constant slope of zero around every input: no gradient
        def forward(self, t):
            return model(t.detach()) + 0 * t.flatten(1)[:, :10]

    out = evaluate_attacks(Flat(), x, y, [parse_attack("fast-t12", eps=0.01)], batch_size=12)[0]
    assert any("12 examples have a zero gradient" in w for w in out.warnings)
    assert any("12 targets asked for, but the model has 10 classes" in w for w in out.warnings)
    from robust_amo.evaluation.report import sanity_checks

    (check,) = [c for c in sanity_checks(1.0, [out]) if c.name == "fast-checks"]
    assert not check.passed and "zero gradient" in check.detail
