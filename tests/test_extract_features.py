"""``densecap extract-features`` (the original's extract_features.lua): each row of feats is the region code of the
detection in the same row of boxes/scores/captions, rows past num_boxes are empty, unreadable inputs are reported
and the rest written, and an interrupted run leaves only the partial file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from densecap_core.checkpoint import make_random_checkpoint
from densecap_core.cli import main
from densecap_core.inference import Captioner


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # lm_grid_attention off: the language model reads the code alone, so the code can be decoded back
    return make_random_checkpoint(tmp_path_factory.mktemp("ck") / "rand.pt", image_size=160, lm_grid_attention=False)


@pytest.fixture
def images(tmp_path, elephant_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_elephant.jpg").write_bytes(elephant_path.read_bytes())
    Image.linear_gradient("L").resize((200, 90)).convert("RGB").save(folder / "b_gradient.png")
    return folder


def extract(*args) -> int:
    return main(["extract-features", *map(str, args)])


def test_rows_are_the_detections_and_feats_their_region_codes(checkpoint, images, tmp_path):
    out = tmp_path / "feats.h5"
    assert extract("--input-dir", images, "--checkpoint", checkpoint, "--device", "cpu", "--output-h5", out,
                   "--boxes-per-image", 7) == 0
    captioner = Captioner(str(checkpoint), device="cpu")
    expected = captioner.caption(sorted(images.iterdir()))
    with h5py.File(out) as f:
        assert [p.decode() for p in f["paths"][:]] == [str(p) for p in sorted(images.iterdir())]
        assert f["feats"].shape == (2, 7, captioner.config.fc_dim) and f.attrs["code_dim"] == captioner.config.fc_dim
        assert list(f["num_boxes"][:]) == [7, 7] and not any(f["errors"][:])
        for i, result in enumerate(expected):
            top = result.regions[:7]
            assert tuple(f["image_sizes"][i]) == (result.width, result.height)
            assert f["scales"][i] == pytest.approx(160 / max(result.width, result.height))
            assert [c.decode() for c in f["captions"][i]] == [r.caption for r in top]
            np.testing.assert_allclose(f["boxes"][i], [r.box for r in top], rtol=1e-5, atol=1e-3)
            np.testing.assert_allclose(f["scores"][i], [r.score for r in top], rtol=1e-5, atol=1e-6)
            codes = torch.from_numpy(f["feats"][i])
            with torch.no_grad():
                # each code gives back its row's score through the objectness head, and its caption through the LM
                scores = torch.sigmoid(captioner.model.recognition.objectness(codes).squeeze(1))
                tokens = captioner.model.language_model.decode(codes, None, captioner.model.beam_size,
                                                               captioner.model.beam_length_alpha)
            np.testing.assert_allclose(scores.numpy(), f["scores"][i], rtol=1e-5, atol=1e-6)
            assert [captioner.vocab.decode(t) for t in tokens.tolist()] == [r.caption for r in top]


def test_short_images_are_zero_padded_and_float16_halves_the_codes(checkpoint, images, tmp_path):
    out = tmp_path / "feats.h5"
    assert extract("--input-image", images / "b_gradient.png", "--checkpoint", checkpoint, "--device", "cpu",
                   "--output-h5", out, "--boxes-per-image", 5000, "--dtype", "float16") == 0
    with h5py.File(out) as f:
        n = int(f["num_boxes"][0])
        assert 0 < n < 5000 and f["feats"].dtype == np.float16
        assert np.abs(f["feats"][0, :n]).sum() > 0 and not np.any(f["feats"][0, n:])
        assert not np.any(f["boxes"][0, n:]) and not any(f["captions"][0, n:])
        assert all(f["captions"][0, :n])


def test_unreadable_inputs_are_reported_and_the_rest_written(checkpoint, images, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# the original's -input_txt\n{images / 'a_elephant.jpg'}\n{tmp_path / 'missing.jpg'}\n\n"
                       f"{tmp_path / 'broken.jpg'}\n")
    out = tmp_path / "feats.h5"
    assert extract("--input-txt", listing, "--checkpoint", checkpoint, "--device", "cpu", "--output-h5", out,
                   "--boxes-per-image", 3) == 1
    err = capsys.readouterr().err
    assert "missing.jpg: no such file" in err and "broken.jpg" in err and "1 of 3 images" in err
    with h5py.File(out) as f:
        assert list(f["num_boxes"][:]) == [3, 0, 0]
        errors = [e.decode() for e in f["errors"][:]]
        assert errors[0] == "" and "no such file" in errors[1] and "broken.jpg" in errors[2]
        assert not np.any(f["feats"][1:])


def test_an_interrupted_run_leaves_the_partial_file_and_not_the_final_name(checkpoint, images, tmp_path, monkeypatch):
    calls = []
    real = Captioner.region_codes

    def interrupted_on_the_second_batch(self, pils, names):
        calls.append(len(pils))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, pils, names)

    monkeypatch.setattr(Captioner, "region_codes", interrupted_on_the_second_batch)
    out = tmp_path / "feats.h5"
    assert extract("--input-dir", images, "--checkpoint", checkpoint, "--device", "cpu", "--output-h5", out,
                   "--batch-size", 1) == 130
    assert not out.exists() and calls == [1, 1]
    with h5py.File(tmp_path / "feats.h5.partial") as f:
        assert f.attrs["images_done"] == 1 and f["num_boxes"][0] > 0 and f["num_boxes"][1] == 0


@pytest.mark.parametrize("case, message", [
    ("folder", "is a folder"), ("empty list", "lists no images"), ("no list", "cannot read it")])
def test_usage_errors_exit_2_with_the_reason(case, message, checkpoint, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("# nothing\n\n")
    out = tmp_path if case == "folder" else tmp_path / "f.h5"
    source = tmp_path / "gone.txt" if case == "no list" else listing
    if case == "folder":
        listing.write_text("x.jpg\n")
    assert extract("--input-txt", source, "--checkpoint", checkpoint, "--output-h5", out) == 2
    assert message in capsys.readouterr().err
