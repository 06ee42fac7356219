"""The base layer: derive_seed, eval_mode, check_choice, and the δ step every method shares."""

from __future__ import annotations

import subprocess
import sys
from typing import Literal

import pytest
import torch
from torch import nn

from robust_amo.config import AttackLoss, ConfigError, Norm, check_choice, choices, from_dict
from robust_amo.methods import JacobianLMOptions
from robust_amo.perturb import concat_norm, delta_step
from robust_amo.runtime import derive_seed, eval_mode, generator


def test_derive_seed_separates_streams_that_arithmetic_mixing_confused():
    # the old rule: loader seed*1_000_003 + e; attack seed*1_000_003 + e + 17 (rank 0)
    loader = {derive_seed(0, "loader", e) for e in range(100)}
    attack = {derive_seed(0, "method", e, 0) for e in range(100)}
    assert len(loader) == 100 and len(attack) == 100 and not loader & attack
    assert derive_seed(1, "loader", 0) != derive_seed(0, "loader", 0)
    assert derive_seed(0, "method", 1, 0) != derive_seed(0, "method", 0, 1)
    assert all(0 <= derive_seed(s, "x") < 2**63 for s in (-5, 0, 10**30))


def test_derive_seed_is_the_same_in_every_process():
    # no hash() randomisation: another interpreter with another PYTHONHASHSEED agrees
    code = "from robust_amo.runtime import derive_seed; print(derive_seed(7, 'pgd-eval', 3, 1))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert int(out) == derive_seed(7, "pgd-eval", 3, 1)
    a, b = generator(7, "x"), generator(7, "x")
    assert torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


def test_eval_mode_restores_the_mode_also_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    with eval_mode(model):
        assert not model.training and not model[1].training
    assert model.training and model[1].training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("boom")
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training


def test_check_choice_is_the_one_check_of_closed_sets():
    assert choices(Norm) == ("linf", "l2") and choices(AttackLoss | None) == ("ce", "cw", None)
    assert check_choice("attack.norm", "l2", Norm) == "l2"
    for bad in ("l3", 2, True, None):
        with pytest.raises(ConfigError, match=r"attack\.norm: .* is not one of linf, l2"):
            check_choice("attack.norm", bad, Norm)
    # the same check reads methods' options: the key is named with its prefix
    with pytest.raises(ConfigError, match=r"method_args\.vjp: 'fast' is not one of loop, "):
        from_dict(JacobianLMOptions, {"vjp": "fast"}, prefix="method_args.")
    assert from_dict(JacobianLMOptions, {"variant": "random"}).variant == "random"
    with pytest.raises(TypeError):
        choices(Literal["a"] | int)


def test_delta_step_is_shrink_times_delta_plus_step_times_grad():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(3, 4, generator=g, requires_grad=True),
              torch.randn(3, 2, 2, generator=g)]
    grads = [torch.randn(3, 4, generator=g), torch.randn(3, 2, 2, generator=g)]
    out = delta_step(deltas, grads, 0.5, 0.9)
    for d, gr, o in zip(deltas, grads, out, strict=True):
        torch.testing.assert_close(o, 0.9 * d.detach() + 0.5 * gr, rtol=0, atol=0)
        assert o.is_leaf and o.requires_grad and o.grad_fn is None
    per_example = torch.tensor([1.0, 0.0, 2.0])
    out = delta_step(deltas, grads, per_example, requires_grad=False)
    torch.testing.assert_close(out[1][2], deltas[1][2].detach() + 2.0 * grads[1][2])
    torch.testing.assert_close(out[0][1], deltas[0][1].detach())
    assert not out[0].requires_grad
    torch.testing.assert_close(concat_norm(out), torch.cat([o.flatten(1) for o in out], 1)
                               .norm(dim=1))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the point
def test_a_sigterm_whose_interrupt_a_finalizer_swallowed_still_stops_at_check_stop():
    """The handler's KeyboardInterrupt inside a __del__ is printed and dropped by Python; the
    remembered signal makes the next check_stop raise, and leaving the block forgets it."""
    import gc
    import os
    import signal

    from robust_amo.runtime import check_stop, sigterm_as_interrupt

    class Sends:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # the handler runs here, inside the finalizer

    with sigterm_as_interrupt():
        check_stop()
        Sends()
        gc.collect()
        with pytest.raises(KeyboardInterrupt):
            check_stop()
    check_stop()


def test_interrupts_deferred_holds_sigint_and_sigterm_until_the_block_ends(request):
    """Inside the block neither signal interrupts; at its end the held one acts as it would
    have (KeyboardInterrupt; SIGTERM inside sigterm_as_interrupt also sets check_stop), and the
    handlers are the previous ones again."""
    import os
    import signal

    from robust_amo.runtime import check_stop, interrupts_deferred, sigterm_as_interrupt

    # Python's own SIGINT handler, whatever an earlier test or library left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # a pending handler would run here
            ran.append("after the signal")
    assert ran == ["after the signal"]
    with sigterm_as_interrupt():
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                sum(range(1000))
                ran.append("after SIGTERM")
        assert ran[-1] == "after SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            check_stop()
    with interrupts_deferred():
        pass  # nothing held: nothing raised
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_sigterm_during_a_checkpoint_write_stops_after_it_with_the_file_whole(tmp_path,
                                                                                 monkeypatch):
    """torch.save turns an interrupt raised inside its writes into a RuntimeError or an abort:
    atomic_save lets the write finish, then the interrupt comes, and the new file loads."""
    import os
    import signal

    from robust_amo.checkpoint import format as ckpt_io
    from robust_amo.runtime import sigterm_as_interrupt

    real_save = torch.save

    def save_and_get_killed(obj, f):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while torch.save runs its Python code
        real_save(obj, f)

    monkeypatch.setattr(ckpt_io.torch, "save", save_and_get_killed)
    path = tmp_path / "checkpoint.pt"
    obj = {"w": torch.arange(100_000, dtype=torch.float32)}
    with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt):
        ckpt_io.atomic_save(obj, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], obj["w"])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
