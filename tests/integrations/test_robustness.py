"""The robustness plugin, exercised through robustness's own train_model and make_and_restore_model.

robustness calls ``.cuda()`` on tensors and modules; the ``no_cuda`` fixture turns those calls into
no-ops for the duration of one CPU test (never in the library). The ``gpu`` test runs the same
training on CUDA without it. robustness is imported once for this module (it takes seconds).
"""

from __future__ import annotations

import copy
import importlib.util
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_amo import checkpoint as ckpt_io
from robust_amo.cli import main as cli_main
from robust_amo.config import ThreatModel
from robust_amo.data import Loader, dataset_info, load_dataset
from robust_amo.errors import CheckpointError, ConfigError
from robust_amo.integrations import robustness as rp
from robust_amo.models import create_model
from robust_amo.perturb import perturb

# isort: off
from cox.utils import Parameters
from robustness import defaults
from robustness.attacker import AttackerModel
from robustness.datasets import CIFAR, DataSet
from robustness.model_utils import make_and_restore_model
from robustness.train import train_model
from tests.helpers import ROOT
# isort: on

INFO = dataset_info("digits")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_cuda(monkeypatch):
    """Make ``.cuda()`` a no-op on tensors and modules, for robustness's loop on CPU."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(nn.Module, "cuda", lambda self, *a, **k: self)


@pytest.fixture(scope="module")
def digits():
    """A tiny in-memory dataset: 32 training and 16 validation digits, batches of 16."""
    train, test = load_dataset("digits")
    return train.subset(torch.arange(32)), test.subset(torch.arange(16))


def _loaders(digits, device="cpu"):
    train, test = digits
    return (Loader(train, 16, device, shuffle=True, seed=3),
            Loader(test, 16, device))


def _args(out_dir, **over) -> Parameters:
    args = Parameters({
        "out_dir": str(out_dir), "adv_train": 1, "epochs": 1, "lr": 0.5, "momentum": 0.9,
        "weight_decay": 0.0, "step_lr": 0, "log_iters": 1, "save_ckpt_iters": -1,
        "constraint": "inf", "eps": 0.1, "attack_lr": 0.025, "attack_steps": 3, "use_best": 1,
        "random_start": 1, "random_restarts": 0, "mixed_precision": 0, "batch_size": 16,
    })
    for k, v in over.items():
        setattr(args, k, v)
    args = defaults.check_and_fill_args(args, defaults.TRAINING_ARGS, CIFAR)
    return defaults.check_and_fill_args(args, defaults.PGD_ARGS, CIFAR)


def _net(seed=0, name="tiny-cnn"):
    torch.manual_seed(seed)
    return rp.architecture(name, rp.robustness_dataset("digits", device="cpu"))


def _native_twin(net, name="tiny-cnn"):
    """Our model with the dataset normalisation inside and ``net``'s weights."""
    twin = create_model(name, 10, input_shape=INFO.input_shape, mean=INFO.mean, std=INFO.std)
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("normalize.")}
    twin.load_state_dict(sd, strict=False)
    return twin


# --------------------------------------------------------------------------------------------


def test_shim_is_the_documented_alias_only():
    shim = sys.modules[rp.SHIM_MODULE]
    public = {k for k in vars(shim) if not k.startswith("__")}
    assert public == {"load_state_dict_from_url"}
    assert shim.load_state_dict_from_url is torch.hub.load_state_dict_from_url


def test_only_the_plugin_imports_robustness():
    # static, so that it costs no second interpreter: nothing in the packages imports robustness
    # or the integration, hence `import robust_amo` (and the CLI) never loads robustness
    pattern = re.compile(r"^\s*(import robustness|from robustness[ .]|"
                         r"from robust_amo\.integrations(\.robustness| import .*robustness)|"
                         r"import robust_amo\.integrations\.robustness|"
                         r"from \.+integrations|from \.+ import .*integrations)", re.M)
    plugin = ROOT / "robust_amo" / "integrations" / "robustness"
    offenders = [
        str(f.relative_to(ROOT))
        for pkg in ("robust_amo", "attacks", "evaluation")
        for f in sorted((ROOT / pkg).rglob("*.py"))
        if plugin not in f.parents and pattern.search(f.read_text())
    ]
    assert offenders == []
    assert pattern.search((plugin / "attacker.py").read_text())  # the pattern does match


@pytest.mark.parametrize("name", ["tiny-cnn", "tiny-mlp", "tiny-wrn"])
def test_our_architectures_in_make_and_restore_model(no_cuda, name):
    ds = rp.robustness_dataset("digits", device="cpu")
    net = _net(1, name)
    by_instance, _ = make_and_restore_model(arch=net, dataset=ds)
    by_name, _ = make_and_restore_model(arch=name, dataset=ds)
    assert isinstance(by_name.model, type(net)) and by_name.model.arch == net.arch
    twin = _native_twin(net, name).eval()
    by_instance.eval()
    x = torch.rand(5, *INFO.input_shape)
    logits, latent = by_instance(x, with_latent=True, with_image=False)
    torch.testing.assert_close(logits, twin(x), rtol=1e-5, atol=1e-6)
    assert latent.shape[0] == 5


def test_architecture_sizes_itself_for_robustness_datasets():
    net = rp.architecture("tiny-cnn", CIFAR("/tmp"))  # robustness's own CIFAR-10
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert (net.normalize.mean == 0).all() and (net.normalize.std == 1).all()
    odd = DataSet("odd", "/tmp", num_classes=3, mean=torch.zeros(1), std=torch.ones(1),
                  transform_train=None, transform_test=None)
    with pytest.raises(ValueError, match="input_shape"):
        rp.architecture("tiny-cnn", odd)
    assert rp.architecture("tiny-mlp", odd, input_shape=(1, 4, 4))(torch.rand(2, 1, 4, 4)).shape \
        == (2, 3)


def test_model_that_normalises_itself_is_refused():
    ds = rp.robustness_dataset("digits", device="cpu")
    double = create_model("tiny-cnn", 10, input_shape=INFO.input_shape, mean=INFO.mean,
                          std=INFO.std)
    with pytest.raises(ValueError, match="mean=None, std=None"):
        rp.RobustAMOAttackerModel(double, ds)
    with pytest.raises(TypeError, match="registered robust-amo architecture"):
        rp.RobustAMOAttackerModel(nn.Linear(64, 10), ds)


@pytest.fixture(scope="module")
def robust_amo_run(digits, tmp_path_factory):
    """Two iterations of robust AMO inside robustness's real train_model (CPU, .cuda no-op)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    mp.setattr(nn.Module, "cuda", lambda self, *a, **k: self)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, for this module-scoped run
    out = tmp_path_factory.mktemp("robustness_run")
    ds = rp.robustness_dataset("digits", device="cpu")
    net = _net(0)
    w0 = copy.deepcopy(net.state_dict())
    model = rp.RobustAMOAttackerModel(net, ds, eta_delta=0.05)
    seen: dict[str, list] = {"train_logits": [], "check": [], "iters": []}

    def train_loss(logits, target):
        seen["train_logits"].append(logits.detach().clone())
        return F.cross_entropy(logits, target)

    def adv_loss(m, inp, target):
        out = m(inp)
        return F.cross_entropy(out, target, reduction="none"), out

    def regularizer(m, inp, target):
        am = m.module
        if am.training:  # after the training forward, before the weight step
            with torch.no_grad():
                with perturb(am.model, am.last_deltas, requires_grad=False):
                    used = am.model(am.normalizer(am.last_adv))
                plain = am.model(am.normalizer(am.last_adv))
            seen["check"].append((seen["train_logits"][-1], used, plain,
                                  [d.clone() for d in am.last_deltas]))
        return 0.0

    def hook(m, i, loop_type, inp, target):
        seen["iters"].append(loop_type)

    args = _args(out, custom_train_loss=train_loss, custom_adv_loss=adv_loss,
                 regularizer=regularizer, iteration_hook=hook)
    try:
        torch.manual_seed(0)
        trained = train_model(args, model, _loaders(digits))
    finally:
        mp.undo()
        torch.set_num_threads(threads)
    return {"out": out, "w0": w0, "model": trained.module, "seen": seen, "ds": ds}


def test_train_model_runs_robust_amo(robust_amo_run):
    seen, model = robust_amo_run["seen"], robust_amo_run["model"]
    assert seen["iters"].count("train") == 2
    # the weights moved
    w1 = model.model.state_dict()
    moved = [k for k in w1 if not torch.equal(w1[k], robust_amo_run["w0"][k])]
    assert "classifier.weight" in moved and "convs.0.weight" in moved
    # the last step's δ is non-zero ...
    assert len(seen["check"]) == 2
    train_logits, used, plain, deltas = seen["check"][-1]
    assert len(deltas) == len(model.model.perturbation_points())
    assert all(d.abs().max() > 0 for d in deltas)
    # ... and the training loss was computed at F(x', δ), not at F(x')
    torch.testing.assert_close(train_logits, used, rtol=0, atol=1e-6)
    assert (used - plain).abs().max() > 1e-4


def test_eta_zero_is_robustness_pgd_training(no_cuda, digits, tmp_path):
    trained = []
    for plugin in (True, False):
        net = _net(0)
        ds = rp.robustness_dataset("digits", device="cpu")
        model = (rp.RobustAMOAttackerModel(net, ds, eta_delta=0.0) if plugin
                 else AttackerModel(net, ds))
        torch.manual_seed(7)  # robustness draws random starts from the global generator
        train_model(_args(tmp_path), model, _loaders(digits))
        trained.append(net.state_dict())
    for k in trained[0]:
        torch.testing.assert_close(trained[0][k], trained[1][k], rtol=0, atol=0, msg=k)


def test_joint_attack_matches_native_robust_amo():
    from robust_amo.attacks import RobustAMOAttack

    ds = rp.robustness_dataset("digits", device="cpu")
    net = _net(2)
    am = rp.RobustAMOAttackerModel(net, ds, rho=0.9, eta_delta=0.3).eval()
    native = RobustAMOAttack(_native_twin(net), eps=0.1, step_size=0.02, steps=4,
                             random_start=False, rho=0.9, eta_delta=0.3)
    train = load_dataset("digits")[0]
    # robustness's normaliser clamps to [0, 1], whose gradient is zero at pixels equal to 0 or 1
    # (its PGD leaves those pixels where they are); keep every iterate inside to compare steps
    x = 0.1 + 0.8 * train.x[:24].float() / 255
    y = train.y[:24]
    xa, da = am.joint_attack(x, y, constraint="inf", eps=0.1, step_size=0.02, iterations=4,
                             use_best=False)
    xb, db = native(x, y)
    torch.testing.assert_close(xa, xb, rtol=0, atol=1e-6)
    assert all(d.abs().max() > 0 for d in db)
    for a, b in zip(da, db, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_use_best_keeps_the_x_and_delta_of_the_worst_iterate():
    ds = rp.robustness_dataset("digits", device="cpu")
    am = rp.RobustAMOAttackerModel(_net(4), ds, eta_delta=0.5).eval()
    train = load_dataset("digits")[0]
    x, y = train.x[:12].float() / 255, train.y[:12]
    # an attack loss whose sign-gradient ascent overshoots its peak (at a per-example mean
    # target), so that the best iterate differs between examples; the CE term gives δ a gradient
    start = ((x - INFO.mean[0]) / INFO.std[0]).flatten(1).mean(1)
    peak = start + torch.linspace(0.0, 0.4, len(y))

    def custom_loss(m, inp, target):
        ce = F.cross_entropy(m(inp), target, reduction="none")
        return -(inp.flatten(1).mean(1) - peak) ** 2 + 0.01 * ce, None

    kw = dict(constraint="inf", eps=0.5, step_size=0.1, custom_loss=custom_loss)

    def loss_at(xa, deltas):
        with torch.no_grad(), perturb(am.model, deltas, requires_grad=False):
            return custom_loss(am.model, am.normalizer(xa), y)[0]

    # without a random start, k iterations end at the k-th iterate pair (x'_k, δ_k)
    pairs = [am.joint_attack(x, y, iterations=k, use_best=False, **kw) for k in range(5)]
    pick = torch.stack([loss_at(*pr) for pr in pairs]).argmax(0)  # (B,)
    xb, db = am.joint_attack(x, y, iterations=4, use_best=True, **kw)
    assert len(set(pick.tolist())) > 1  # the best iterate differs between examples
    for i, k in enumerate(pick.tolist()):
        xk, dk = pairs[k]
        assert torch.equal(xb[i], xk[i])
        for a, b in zip(db, dk, strict=True):
            assert torch.equal(a[i], b[i]) if b is not None else a[i].abs().max() == 0


@pytest.mark.parametrize("variant", ["all", "random"])
def test_regularizer_equals_native_jacobian_penalty(variant):
    from robust_amo.methods import jacobian_penalty

    ds = rp.robustness_dataset("digits", device="cpu")
    net = _net(3)
    am = nn.DataParallel(rp.RobustAMOAttackerModel(net, ds))  # what train_model hands over
    twin = _native_twin(net)
    train = load_dataset("digits")[0]
    x = train.x[:6].float() / 255  # many pixels are exactly 0
    y = train.y[:6]
    reg = rp.JacobianLMRegularizer(0.7, variant, torch.Generator().manual_seed(5))
    got = reg(am, x, y)
    want = 0.7 * jacobian_penalty(twin, x, variant=variant,
                                  generator=torch.Generator().manual_seed(5)).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # differentiable (double backpropagation) with the same weight gradients
    g_got = torch.autograd.grad(got, net.classifier.weight)[0]
    g_want = torch.autograd.grad(want, twin.classifier.weight)[0]
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        assert reg(am, x, y) == 0


def test_regularizer_is_zero_in_adversarial_validation():
    """robustness's adversarial validation loop runs with gradients enabled, model in eval mode:
    the penalty is a training term and must not be added (nor its double backward built)."""
    ds = rp.robustness_dataset("digits", device="cpu")
    am = nn.DataParallel(rp.RobustAMOAttackerModel(_net(3), ds)).eval()
    x = torch.rand(4, *INFO.input_shape)
    assert torch.is_grad_enabled()
    assert rp.JacobianLMRegularizer(0.7)(am, x, torch.zeros(4, dtype=torch.long)) == 0


def test_robustness_checkpoint_to_robust_amo_and_back(robust_amo_run, tmp_path, capsys):
    src = robust_amo_run["out"] / "checkpoint.pt.latest"
    model = robust_amo_run["model"].eval()
    # no architecture recorded in robustness's file: the error says what to pass
    assert cli_main(["convert-checkpoint", str(src), str(tmp_path / "x.pt")]) == 2
    assert "--arch" in capsys.readouterr().err
    ours = tmp_path / "ours.pt"
    assert cli_main(["convert-checkpoint", str(src), str(ours), "--arch", "tiny-cnn",
                     "--dataset", "digits"]) == 0
    ck = ckpt_io.load_checkpoint(ours)
    native = ckpt_io.model_from_checkpoint(ck)
    x = torch.rand(7, *INFO.input_shape)
    torch.testing.assert_close(native(x), model(x, with_image=False), rtol=1e-5, atol=1e-6)
    assert ck["mean"] == pytest.approx(INFO.mean) and ck["epoch"] == 1
    # robust-amo's own loader (what `robust-amo eval` uses) reads robustness's run folder
    direct = ckpt_io.load_checkpoint(robust_amo_run["out"], arch="tiny-cnn", dataset="digits")
    torch.testing.assert_close(ckpt_io.model_from_checkpoint(direct)(x), native(x), rtol=0,
                               atol=0)
    with pytest.raises(CheckpointError, match="pass arch .* and dataset$"):
        ckpt_io.load_checkpoint(src)
    # and back: the same AttackerModel state as robustness wrote
    back = tmp_path / "back.pt"
    assert cli_main(["convert-checkpoint", str(ours), str(back)]) == 0
    original = torch.load(src, weights_only=True)["model"]
    again = torch.load(back, weights_only=True)["model"]
    assert original.keys() == again.keys()
    for k in original:
        torch.testing.assert_close(again[k], original[k], rtol=0, atol=0, msg=k)


def test_robust_amo_eval_reads_a_robustness_run(robust_amo_run, tmp_path):
    from robust_amo.evaluation.loading import load_model

    model, meta = load_model(robust_amo_run["out"], "cpu", arch="tiny-cnn", dataset="digits")
    assert meta["path"].endswith("checkpoint.pt.latest") and meta["dataset"] == "digits"
    x = torch.rand(3, *INFO.input_shape)
    torch.testing.assert_close(model(x), robust_amo_run["model"].eval()(x, with_image=False),
                               rtol=1e-5, atol=1e-6)
    report = tmp_path / "report.json"
    assert cli_main(["eval", "--checkpoint", str(robust_amo_run["out"]), "--arch", "tiny-cnn",
                     "--dataset", "digits", "--attack", "pgd5", "--eps", "0.1",
                     "--n-examples", "16", "--no-sanity", "--no-progress",
                     "--out", str(report)]) == 0
    assert report.is_file()


def test_robust_amo_checkpoint_loads_in_robustness(no_cuda, tmp_path):
    from robust_amo.resolve import resolve
    from robust_amo.train import train

    cfg = resolve(None, [{"arch": "tiny-mlp", "dataset": "digits", "method": "pgd",
                          "epochs": 1, "batch_size": 32, "out": str(tmp_path / "run"),
                          "device": "cpu",
                          "data": {"train_subset": 64, "augment": False},
                          "attack": {"eps": 0.1, "step_size": 0.05, "steps": 1},
                          "eval": {"n_examples": 8, "steps": 1}}])
    train(cfg)
    native = ckpt_io.model_from_checkpoint(ckpt_io.load_checkpoint(tmp_path / "run"))
    x = torch.rand(6, *INFO.input_shape)
    # the file `robust-amo train` wrote loads in robustness's own make_and_restore_model as is
    ds = DataSet("grey", "/tmp", num_classes=10, mean=torch.tensor([0.5]),
                 std=torch.tensor([0.25]), transform_train=None, transform_test=None)
    direct, loaded = make_and_restore_model(
        arch=rp.architecture("tiny-mlp", ds, input_shape=INFO.input_shape), dataset=ds,
        resume_path=str(tmp_path / "run" / "checkpoint.pt"))
    torch.testing.assert_close(direct.eval()(x, with_image=False), native(x), rtol=1e-5,
                               atol=1e-6)
    assert loaded["epoch"] == 1
    conv = tmp_path / "for_robustness.pt"
    assert cli_main(["convert-checkpoint", str(tmp_path / "run"), str(conv)]) == 0
    # converted, the normalisation moves to robustness's normaliser; the dataset's other
    # statistics are overridden by the checkpoint's, as they must be
    arch = rp.architecture("tiny-mlp", ds, input_shape=INFO.input_shape)
    model, loaded = make_and_restore_model(arch=arch, dataset=ds, resume_path=str(conv))
    torch.testing.assert_close(model.eval()(x, with_image=False), native(x), rtol=1e-5,
                               atol=1e-6)
    assert loaded["epoch"] == 1
    # and back to robust-amo (the converted file records the architecture): the same model
    back = tmp_path / "back.pt"
    assert cli_main(["convert-checkpoint", str(conv), str(back)]) == 0
    original = ckpt_io.load_checkpoint(tmp_path / "run")
    again = ckpt_io.load_checkpoint(back)
    assert (again["arch"], again["dataset"], again["input_shape"]) == (
        "tiny-mlp", "digits", list(INFO.input_shape))
    for k, v in original["model"].items():
        torch.testing.assert_close(again["model"][k], v, rtol=0, atol=0, msg=k)
    # the plugin's make_model reads robust-amo checkpoints directly, as a RobustAMOAttackerModel
    ours, _ = rp.make_model(arch="tiny-mlp", dataset=ds, input_shape=INFO.input_shape,
                            resume_path=str(tmp_path / "run"), device="cpu")
    torch.testing.assert_close(ours.eval()(x, with_image=False), native(x), rtol=1e-5,
                               atol=1e-6)


def test_example_script_runs(no_cuda, tmp_path):
    spec = importlib.util.spec_from_file_location("robustness_train",
                                                  ROOT / "examples" / "robustness_train.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.main(["--dataset", "digits", "--arch", "tiny-mlp", "--epochs", "1",
                          "--batch-size", "16", "--train-subset", "32", "--val-examples", "16",
                          "--attack-steps", "2", "--jacobian-lm", "0.01", "--augment", "off",
                          "--out", str(tmp_path)])
    assert isinstance(model.module, rp.RobustAMOAttackerModel)
    assert model.module.last_deltas is not None
    assert (tmp_path / "checkpoint.pt.latest").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_model_robust_amo_on_cuda(digits, tmp_path):
    ds = rp.robustness_dataset("digits", device="cuda")
    net = _net(0)
    w0 = copy.deepcopy(net.state_dict())
    model, _ = rp.make_model(arch=net, dataset=ds, eta_delta=0.05)
    reg = rp.JacobianLMRegularizer(0.01)
    trained = train_model(_args(tmp_path, regularizer=reg), model, _loaders(digits, "cuda"))
    am = trained.module
    assert all(d.is_cuda and d.abs().max() > 0 for d in am.last_deltas)
    w1 = am.model.state_dict()
    assert not torch.equal(w1["classifier.weight"].cpu(), w0["classifier.weight"])
    src = tmp_path / "checkpoint.pt.latest"
    ours = tmp_path / "ours.pt"
    assert cli_main(["convert-checkpoint", str(src), str(ours), "--arch", "tiny-cnn",
                     "--dataset", "digits"]) == 0
    native = ckpt_io.model_from_checkpoint(ckpt_io.load_checkpoint(ours)).to("cuda")
    x = torch.rand(4, *INFO.input_shape, device="cuda")
    torch.testing.assert_close(native(x), am.eval()(x, with_image=False), rtol=1e-4,
                               atol=1e-5)


def test_attack_args_are_our_threat_model_in_robustness_names():
    threat = ThreatModel(norm="l2", eps=0.5, step_size=0.125, steps=7, random_start=False)
    assert rp.attack_args(threat) == {"constraint": "2", "eps": 0.5, "attack_lr": 0.125,
                                      "attack_steps": 7, "random_start": 0}
    assert rp.attack_args(ThreatModel())["constraint"] == "inf"
    with pytest.raises(ConfigError, match="loss 'cw'"):
        rp.attack_args(ThreatModel(loss="cw"))
