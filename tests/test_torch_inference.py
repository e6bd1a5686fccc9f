"""``inference`` and ``write_predictions`` with a torch model: a ``torch.nn.Module`` gets x
channels first (as ``as_torch_dataset(channels_first=True)`` trained it), in eval mode without
gradients; its predictions come back channels last, stitched, equal to the module applied to
each slice by hand."""

from __future__ import annotations

import numpy as np
import pytest

from loaders import Config, DatasetCatalog, build_loader

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def test_loader(small_store):
    root, truth = small_store
    DatasetCatalog.register("torch_inference", str(root), split="train")
    cfg = Config(TAG="DefaultDataLoader", CATEGORIES=(0, 1, 2), INCLUDE_BACKGROUND=False)
    yield build_loader(cfg, "torch_inference", 4, True, False, False), truth
    DatasetCatalog.remove("torch_inference")


def _module():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 3, 1)
    # dropout shows whether eval mode was used: in training mode it would zero channels at random
    return torch.nn.Sequential(conv, torch.nn.Dropout(0.5), torch.nn.Softmax(dim=1))


def _by_hand(module, image):
    module.eval()
    with torch.no_grad():
        slices = torch.from_numpy(np.moveaxis(image.astype(np.float32), 2, 0)[:, None])  # (D, 1, H, W)
        out = module(slices).numpy()  # (D, 3, H, W)
    return np.moveaxis(out, (0, 1), (2, 3))  # (H, W, D, 3)


def test_a_torch_module_is_given_channels_first_in_eval_mode(test_loader):
    loader, truth = test_loader
    module = _module()
    module.train()
    seen = 0
    for inputs, outputs in loader.inference(module):
        want = _by_hand(_module(), truth[inputs["scan_id"]][0])
        np.testing.assert_allclose(outputs["y_pred"], want, rtol=1e-5, atol=1e-6)
        seen += 1
    assert seen == len(loader.scans) and module.training  # its mode given back


def test_channels_last_modules_and_plain_callables_say_so(test_loader):
    loader, truth = test_loader
    module = _module()

    class ChannelsLast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self, x):  # (N, H, W, 1) -> (N, H, W, 3)
            return self.inner(x.movedim(-1, 1)).movedim(1, -1)

    def plain(x):  # numpy (N, 1, H, W) -> numpy (N, 3, H, W)
        module.eval()  # (the module's mode is the caller's business here)
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    module.eval()
    first = min(truth)
    want = _by_hand(module, truth[first][0])
    for model, kwargs in ((ChannelsLast(), {"channels_first": False}), (plain, {"channels_first": True})):
        inputs, outputs = next(iter(loader.inference(model, **kwargs)))
        assert inputs["scan_id"] == first
        np.testing.assert_allclose(outputs["y_pred"], want, rtol=1e-5, atol=1e-6)


def test_channels_first_with_a_keras_model_is_refused_in_one_line(test_loader):
    import keras

    loader, _ = test_loader
    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, activation="softmax")(inputs))
    with pytest.raises(ValueError, match=r"^channels_first=True: a Keras model here takes channels last"):
        next(iter(loader.inference(model, channels_first=True)))


def test_a_keras_model_stays_a_keras_model_whatever_the_backend(test_loader):
    """On Keras' torch backend a Keras model is a torch.nn.Module too: it still gets x channels
    last, as it was trained (`make test-torch` runs this under KERAS_BACKEND=torch)."""
    import keras

    loader, truth = test_loader
    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1, activation="softmax")(inputs))
    first = min(truth)
    image = truth[first][0].astype(np.float32)
    want = np.stack(
        [
            keras.ops.convert_to_numpy(model.predict_on_batch(image[None, :, :, z, None]))[0]
            for z in range(image.shape[2])
        ],
        axis=2,
    )
    inputs_, outputs = next(iter(loader.inference(model)))
    assert inputs_["scan_id"] == first
    np.testing.assert_allclose(outputs["y_pred"], want, rtol=1e-5, atol=1e-6)


class _DeepSupervision(torch.nn.Module):
    """As nnU-Net trains: full resolution first, then coarser outputs."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        full = self.inner(x)
        return (full, torch.nn.functional.avg_pool2d(full, 2))


def test_a_module_with_deep_supervision_is_stitched_from_its_full_resolution_output(test_loader):
    loader, truth = test_loader
    module = _module()
    first = min(truth)
    want = _by_hand(_module(), truth[first][0])
    for kwargs in ({}, {"output": 0}, {"output": -2}):
        inputs, outputs = next(iter(loader.inference(_DeepSupervision(module), **kwargs)))
        assert inputs["scan_id"] == first
        np.testing.assert_allclose(outputs["y_pred"], want, rtol=1e-5, atol=1e-6)


def test_an_output_that_is_not_there_is_refused_in_one_line(test_loader):
    loader, _ = test_loader
    with pytest.raises(
        ValueError, match=r"^output=2: the model gives 2 outputs \(a list\); pick one by its index, 0 to 1$"
    ):
        next(iter(loader.inference(_DeepSupervision(_module()), output=2)))
    with pytest.raises(ValueError, match=r"^output=1: the model gives a single output; leave output out$"):
        next(iter(loader.inference(_module(), output=1)))


def test_named_keras_outputs_need_output_to_name_one(test_loader):
    import keras

    loader, truth = test_loader
    inputs = keras.Input((None, None, 1))
    seg = keras.layers.Conv2D(3, 1, activation="softmax", name="seg")(inputs)
    aux = keras.layers.Conv2D(1, 1, activation="sigmoid", name="aux")(inputs)
    model = keras.Model(inputs, {"seg": seg, "aux": aux})
    with pytest.raises(ValueError, match=r"^the model gives named outputs \['aux', 'seg'\]: pick the one"):
        next(iter(loader.inference(model)))
    first = min(truth)
    image = truth[first][0].astype(np.float32)
    single = keras.Model(inputs, seg)
    want = np.stack(
        [
            keras.ops.convert_to_numpy(single.predict_on_batch(image[None, :, :, z, None]))[0]
            for z in range(image.shape[2])
        ],
        axis=2,
    )
    _, outputs = next(iter(loader.inference(model, output="seg")))
    np.testing.assert_allclose(outputs["y_pred"], want, rtol=1e-5, atol=1e-6)
    listed = keras.Model(inputs, [seg, aux])
    _, outputs = next(iter(loader.inference(listed)))
    np.testing.assert_allclose(outputs["y_pred"], want, rtol=1e-5, atol=1e-6)
