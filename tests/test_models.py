import pytest
import torch

from robust_amo import UnknownModelError, create_model, list_models
from robust_amo.models import normalize_name

SHAPES = {
    "wrn16-10": (3, 32, 32), "wrn28-10": (3, 32, 32), "wrn34-10": (3, 32, 32),
    "tiny-wrn": (3, 32, 32), "preact-resnet18": (3, 32, 32), "mnist-cnn2": (1, 28, 28),
    "mnist-cnn3": (1, 28, 28), "mlp1": (1, 28, 28), "mlp3": (1, 28, 28),
    "small-cnn": (1, 28, 28), "tiny-cnn": (1, 8, 8), "tiny-mlp": (1, 8, 8), "linear": (1, 8, 8),
}


def test_every_registered_name_is_covered():
    fixed = [n for n in list_models() if n not in ("wrnD-K", "mlpL[-W]")]
    assert set(fixed) <= set(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_output_shape_and_declared_points(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, input_shape=SHAPES[name]).eval()
    x = torch.rand(2, *SHAPES[name])
    with torch.no_grad():
        logits, latent = model(x, with_latent=True)
    assert logits.shape == (2, 7)
    assert latent.shape == (2, model.classifier.in_features)
    assert isinstance(model.classifier, torch.nn.Linear)
    points = model.perturbation_points()
    assert points and all(isinstance(m, torch.nn.Module) for _, m in points)
    assert model.classifier not in [m for _, m in points]


@pytest.mark.parametrize("name,points", [("wrn16-10", 12), ("wrn28-10", 24), ("wrn34-10", 30),
                                         ("wrn22-2", 18), ("preact-resnet18", 16)])
def test_perturbation_point_counts(name, points):
    model = create_model(name)
    names = [n for n, _ in model.perturbation_points()]
    assert len(names) == points
    # conv1 and conv2 of every block, never the stem or shortcut convs
    assert all(n.endswith(("conv1", "conv2")) for n in names)
    assert not any("shortcut" in n or n == "stem" for n in names)


def test_wrn_depth_width_parse():
    m = create_model("WRN_28_10")
    assert m.arch == "wrn28-10"
    assert len(m.blocks) == 12
    assert m.blocks[0].conv1.out_channels == 160 and m.classifier.in_features == 640
    m = create_model("wrn-22-4")
    assert len(m.blocks) == 9 and m.classifier.in_features == 256
    assert normalize_name("WideResNet-16-8") == "wrn16-8"
    with pytest.raises(UnknownModelError, match="6n"):
        create_model("wrn15-2")


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownModelError) as e:
        create_model("resnet9000")
    assert "wrn28-10" in str(e.value) and "mnist-cnn2" in str(e.value)


def test_normalisation_is_inside_the_model():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    a = create_model("tiny-wrn", mean=mean, std=std).eval()
    b = create_model("tiny-wrn").eval()
    b.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("normalize")},
                      strict=False)
    x = torch.rand(2, 3, 32, 32)
    xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(xn))
    assert "normalize.mean" in a.state_dict()


def test_robustness_keywords():
    torch.manual_seed(0)
    model = create_model("tiny-wrn").eval()
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    logits, post = model(x, with_latent=True)
    _, pre = model(x, with_latent=True, no_relu=True)
    torch.testing.assert_close(post, torch.nn.functional.adaptive_avg_pool2d(
        torch.relu(model.bn(model.blocks(model.stem(model.normalize(x))))), 1).flatten(1))
    assert (pre < 0).any() and not torch.equal(pre, post)
    # fake_relu: same values, identity gradient through the last ReLU
    fake = model(x, fake_relu=True)
    torch.testing.assert_close(fake, logits)
    g_fake, = torch.autograd.grad(fake.sum(), x)
    g_real, = torch.autograd.grad(logits.sum(), x)
    assert not torch.allclose(g_fake, g_real)
    with pytest.raises(ValueError, match="with_latent"):
        model(x, no_relu=True)
