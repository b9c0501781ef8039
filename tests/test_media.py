"""Media writers: png and gif decode back to what was written; errors name the fix."""

import numpy as np
import pytest
import torch
from PIL import Image

from dit_rt import media


def test_png_roundtrip(tmp_path):
    frames = torch.rand(1, 17, 23, 3)
    (path,) = media.save(frames, tmp_path / "x.png")
    back = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(back, media.to_uint8(frames)[0].numpy())


def test_png_sequence_for_videos(tmp_path):
    paths = media.save(torch.rand(3, 8, 8, 3), tmp_path / "v.png")
    assert [p.name for p in paths] == ["v_00000.png", "v_00001.png", "v_00002.png"]


def test_gif_roundtrip_through_fixed_palette(tmp_path):
    frames = torch.rand(4, 20, 30, 3)
    frames[0, :5] = 0.0  # long runs exercise the LZW table growth
    (path,) = media.save(frames, tmp_path / "x.gif", fps=10)
    im = Image.open(path)
    assert im.n_frames == 4 and im.size == (30, 20) and im.info["duration"] == 100
    ref = media.to_uint8(frames).numpy().astype(int)
    for i in range(4):
        im.seek(i)
        err = np.abs(np.asarray(im.convert("RGB")).astype(int) - ref[i]).max()
        assert err <= 43  # 3-3-2 palette: at most half a blue step (255 / 3 / 2)


def test_large_gif_resets_lzw_table(tmp_path):
    frames = torch.rand(1, 96, 96, 3)  # far more than 4096 codes in one frame
    (path,) = media.save(frames, tmp_path / "big.gif")
    im = Image.open(path)  # the first frame decodes to palette indices
    ref = media._palette_indices(media.to_uint8(frames))[0].numpy()
    assert np.array_equal(np.asarray(im), ref)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="extension must be one of"):
        media.save(torch.rand(1, 4, 4, 3), tmp_path / "x.bmp")
    with pytest.raises(ValueError, match=r"\(T, H, W, C\)"):
        media.save(torch.rand(4, 4, 3), tmp_path / "x.png")
    with pytest.raises(ValueError, match="fps must be positive"):
        media.save(torch.rand(1, 4, 4, 3), tmp_path / "x.gif", fps=0)


def test_mp4_missing_extra_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "imageio_ffmpeg", None)
    with pytest.raises(ImportError, match=r"pip install 'dit-rt\[video\]'"):
        media.save(torch.rand(2, 8, 8, 3), tmp_path / "x.mp4")
