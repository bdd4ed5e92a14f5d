"""instdisc.downstream.finetune: trains, saves atomically, reloads to the same predictions, is a MODEL again."""
import json

import pytest
import torch

from instdisc.data import batch_eval, build_dataset
from instdisc.downstream.finetune import FinetunedClassifier, finetune, load_finetuned
from instdisc.errors import InstdiscError
from instdisc.export.encoder import export_encoder, load_torchscript
from instdisc.source import open_model
from instdisc.training import load_run


@pytest.fixture(scope="module")
def tuned(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "ft"
    res = finetune(run[0], "fashion-mnist:train", "fashion-mnist:test", out, epochs=2, batch_size=32, lr=0.05,
                   data_root=str(run[1]))
    return out, res


def test_saves_and_reloads_same_predictions(run, tuned):
    out, res = tuned
    assert {p.name for p in out.iterdir()} == {"encoder.pt", "encoder.torchscript.pt", "classifier.pt",
                                               "metadata.json"}
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["kind"] == "instdisc-finetuned" and meta["classifier"]["n_classes"] == 10
    assert meta["results"]["top1"] == pytest.approx(res.top1) and meta["finetune"]["epochs"] == 2
    net, transform, _ = load_finetuned(out)
    assert isinstance(net, FinetunedClassifier) and not net.training
    ds = build_dataset("fashion-mnist:test", data_root=str(run[1]))
    x = batch_eval(ds.array, ds)  # (40, 1, 28, 28)
    with torch.no_grad():
        logits = net(x)
        top1 = float((logits.argmax(1) == torch.from_numpy(ds.labels)).float().mean() * 100)
        assert top1 == pytest.approx(res.top1)
        scripted = load_torchscript(out)
        assert (scripted(x) - net.encoder(x)).abs().max().item() < 1e-5
    x1 = transform(ds.load_image(0)).unsqueeze(0)
    torch.testing.assert_close(x1, x[:1], atol=1e-6, rtol=0)


def test_encoder_changed_and_usable_as_model(run, tuned):
    out, _ = tuned
    _, model, _ = load_run(run[0])
    src = open_model(out)
    assert src.kind == "export"
    diff = [not torch.equal(a, b) for a, b in zip(model.encoder.state_dict().values(),
                                                   src.encoder.state_dict().values())]
    assert any(diff)  # all of the encoder is trained, not only the new layer


def test_from_export_and_deterministic(run, tuned, tmp_path):
    export_encoder(run[0], tmp_path / "enc")
    res = finetune(tmp_path / "enc", "fashion-mnist:train", "fashion-mnist:test", tmp_path / "ft", epochs=2,
                   batch_size=32, lr=0.05, data_root=str(run[1]))
    assert res.top1 == pytest.approx(tuned[1].top1)  # same weights, same seed: same run
    a = torch.load(tmp_path / "ft" / "classifier.pt", weights_only=True)
    b = torch.load(tuned[0] / "classifier.pt", weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_refuses_existing_out_and_bad_settings(run, tuned):
    with pytest.raises(InstdiscError, match="already exists.*--overwrite"):
        finetune(run[0], "fashion-mnist:train", "fashion-mnist:test", tuned[0], data_root=str(run[1]))
    with pytest.raises(InstdiscError, match="--lr"):
        finetune(run[0], "fashion-mnist:train", "fashion-mnist:test", tuned[0].parent / "x", lr=0,
                 data_root=str(run[1]))
    with pytest.raises(InstdiscError, match="not a fine-tuned"):
        out = tuned[0].parent / "enc"
        export_encoder(run[0], out)
        load_finetuned(out)



def test_without_augmentation(run, tmp_path):
    res = finetune(run[0], "fashion-mnist:train", "fashion-mnist:test", tmp_path / "ft", epochs=1, batch_size=32,
                   data_root=str(run[1]), augment=False)
    assert res.settings["augment"] is False and 0 <= res.top1 <= 100
