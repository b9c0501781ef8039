"""What a new user hit (issue 17): the demo on a core install, output errors, CLI-only fixes, `info` on
damaged files, silently accepted input, the seed and metadata, --version / -v / defaults, the README's
commands. Each test failed before its fix."""

import json
import logging
import os
import re
import shlex
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import dit_rt
from dit_rt import media
from dit_rt.cli import main
from dit_rt.demo import write_tiny_wan

README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = ["--height", "32", "--width", "48", "--frames", "5", "--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_wan(tmp_path_factory.mktemp("tiny-wan"))


@pytest.fixture(scope="module")
def pipe(tiny):
    return dit_rt.load(str(tiny), device="cpu", dtype=torch.float32)


@pytest.fixture(autouse=True)
def _no_cli_log_handler():
    """`main(['-v', ...])` adds a stderr handler to the dit_rt logger; take it off after each test."""
    log = logging.getLogger("dit_rt")
    level = log.level
    yield
    for h in [h for h in log.handlers if getattr(h, "_dit_rt_cli", False)]:
        log.removeHandler(h)
    log.setLevel(level)


def _generate(pipe, **kwargs):
    kwargs = dict(height=32, width=48, num_frames=5, num_inference_steps=2, progress_bar=False) | kwargs
    return pipe.generate("a cat", **kwargs)


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dit-rt: error:"), err
    return lines[0]


# ---------------------------------------------------------------------------- 1. the demo on a core install

_NO_NUMPY = """
import contextlib, io, json, sys
sys.modules["numpy"] = None  # a core install: numpy is not a dependency
if {block_ffmpeg}:
    sys.modules["imageio_ffmpeg"] = None
from dit_rt.cli import main
results = []
for out in {outputs}:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["demo", "--steps", "1", "-o", out])
    results.append([rc, err.getvalue()])
print(json.dumps(results))
"""


def _demo_without_numpy(tmp_path, outputs, block_ffmpeg=False):
    script = _NO_NUMPY.format(outputs=[str(tmp_path / o) for o in outputs], block_ffmpeg=block_ffmpeg)
    env = dict(os.environ, DIT_RT_CACHE=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_demo_runs_without_numpy(tmp_path):
    results = _demo_without_numpy(tmp_path, ["demo.gif", "demo.mp4"])
    assert [rc for rc, _ in results] == [0, 0], results
    assert (tmp_path / "demo.gif").read_bytes()[:6] == b"GIF89a"
    assert (tmp_path / "demo.mp4").read_bytes()[4:8] == b"ftyp"


def test_demo_without_video_extra_names_it_and_leaves_nothing(tmp_path):
    ((rc, err),) = _demo_without_numpy(tmp_path, ["demo.mp4"], block_ffmpeg=True)
    assert rc == 2
    assert "pip install 'dit-rt[video]'" in _one_line_error(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no cache folder, no output file


def test_failed_demo_checkpoint_leaves_no_cache_folder(tmp_path, monkeypatch):
    from dit_rt import demo

    def broken(folder, seed=0):
        (folder / "transformer").mkdir()
        raise OSError("disk full")

    monkeypatch.setenv("DIT_RT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "write_tiny_wan", broken)
    with pytest.raises(OSError, match="disk full"):
        demo.tiny_wan_folder()
    assert list(tmp_path.iterdir()) == []


def test_demo_checkpoint_is_a_valid_safetensors_file(tiny):
    from safetensors.torch import load_file

    from dit_rt.loaders import read_header

    path = tiny / "transformer" / "diffusion_pytorch_model.safetensors"
    header, _ = read_header(path)
    loaded = load_file(path)
    assert set(loaded) == set(header) and all(loaded[k].shape == header[k].shape for k in header)


# ------------------------------------------------------------------------------------ 2. writing the output


@pytest.mark.parametrize("ext", [".mp4", ".gif", ".png", ".webp"])
def test_save_to_a_directory_is_one_line(tmp_path, ext):
    target = tmp_path / f"out{ext}"
    target.mkdir()
    with pytest.raises(OSError) as e:
        media.save(torch.rand(1, 8, 8, 3), target)
    assert "\n" not in str(e.value) and str(target) in str(e.value) and "directory" in str(e.value)


def test_save_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError) as e:
        media.save(torch.rand(2, 8, 8, 3), tmp_path / "file" / "out.mp4")
    assert "\n" not in str(e.value) and "out.mp4" in str(e.value)


def test_failing_writer_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_pipe(frames, path, fps, metadata=None):
        Path(path).write_bytes(b"\0" * 100)  # ffmpeg wrote part of the file, then the pipe broke
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(media, "_write_mp4", broken_pipe)
    with pytest.raises(OSError) as e:
        media.save(torch.rand(2, 8, 8, 3), tmp_path / "x.mp4")
    assert str(e.value) == f"cannot write {tmp_path / 'x.mp4'}: Broken pipe"
    assert list(tmp_path.iterdir()) == []


def test_png_sequence_is_removed_when_a_frame_fails(tmp_path, monkeypatch):
    calls = []

    def encode(image, metadata=None):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return b"png"

    monkeypatch.setattr(media, "encode_png", encode)
    with pytest.raises(OSError, match="No space left on device"):
        media.save(torch.rand(4, 8, 8, 3), tmp_path / "v.png")
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_output_path_is_one_line(tiny, tmp_path, capsys):
    (tmp_path / "out.mp4").mkdir()
    rc = main(["generate", "--model", str(tiny), "--prompt", "x", *SMALL, "-o", str(tmp_path / "out.mp4")])
    assert rc == 2
    assert "out.mp4" in _one_line_error(capsys.readouterr().err)


# ----------------------------------------------------------------------------- 3. fixes spelled for the CLI


def test_cli_cache_model_and_coefficients_flags(tiny, tmp_path, capsys):
    from dit_rt.cli import _runtime_options, build_parser

    a = build_parser().parse_args(
        ["generate", "--model", "m", "--prompt", "p", "-o", "x.gif", "--cache", "teacache"]
        + ["--cache-model", "wan2.1-t2v-1.3b", "--cache-coefficients", "1e3,-2.5,0.5"]
    )
    assert _runtime_options(a)["cache"] == dict(
        kind="teacache", model="wan2.1-t2v-1.3b", coefficients=[1000.0, -2.5, 0.5]
    )
    out = tmp_path / "x.gif"
    args = ["generate", "--model", str(tiny), "--prompt", "x", *SMALL, "-o", str(out), "-v", "--cache"]
    assert main([*args, "teacache", "--cache-coefficients", "1,0", "--cache-threshold", "0.5"]) == 0
    assert out.is_file() and re.search(
        r"stats: cache teacache, computed \d+, skipped \d+", capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--cache", "teacache"], "--cache-coefficients .*--cache-model ALIAS"),
        (["--cache", "fbcache", "--cache-model", "wan2.1-t2v-1.3b"], "apply to --cache teacache"),
        (["--cache-coefficients", "1,2"], "need --cache teacache"),
        (["--cache", "teacache", "--cache-coefficients", "1,x"], "comma-separated numbers"),
    ],
)
def test_cli_cache_errors_name_cli_flags(tiny, tmp_path, capsys, flags, match):
    rc = main(
        ["generate", "--model", str(tiny), "--prompt", "x", *SMALL, "-o", str(tmp_path / "x.gif"), *flags]
    )
    assert rc == 2
    assert re.search(match, _one_line_error(capsys.readouterr().err))


# ---------------------------------------------------------------------------- 4. info on damaged checkpoints


def _damaged_copy(tiny, tmp_path, damage) -> Path:
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny, folder)
    damage(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    return folder


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda p: p.write_bytes(b"\1\2\3\4"), "truncated or not a safetensors file"),
        (lambda p: p.write_bytes(struct.pack("<Q", 2**60) + b"{}" * 100), "truncated or corrupt"),
        (lambda p: p.write_bytes(p.read_bytes()[:-64]), "truncated file: tensor"),
        (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"}{x]" + b"\0" * 64), "corrupt safetensors header"),
    ],
    ids=["4-bytes", "huge-header-length", "truncated-data", "garbage-json"],
)
def test_info_reports_damaged_files(tiny, tmp_path, capsys, damage, match):
    folder = _damaged_copy(tiny, tmp_path, damage)
    assert main(["info", str(folder)]) == 2
    out = capsys.readouterr()
    line = _one_line_error(out.err)
    assert "transformer/diffusion_pytorch_model.safetensors" in line and re.search(match, line), line
    assert re.search(r"transformer .* corrupt", out.out) and re.search(r"vae .* params", out.out)


def test_info_reuses_the_loader_checks():
    import dit_rt.cli as cli

    assert not hasattr(cli, "_safetensors_header")


# ------------------------------------------------------------------------------------ 5. silently accepted


def test_save_rejects_fps_zero(pipe, tmp_path):
    out = _generate(pipe, seed=0)
    for fps in (0, -8):
        with pytest.raises(ValueError, match="fps must be positive"):
            out.save(tmp_path / "x.gif", fps=fps)
    assert not (tmp_path / "x.gif").exists()


def test_long_prompt_warns_how_many_tokens_are_dropped(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="dit_rt"):
        pipe.generate(
            "abcdefghijklmnopqrstuvwxyz",  # 1 token per letter + the word marker + </s> = 28 tokens
            height=32,
            width=48,
            num_frames=5,
            num_inference_steps=1,
            guidance_scale=1.0,
            max_sequence_length=16,
            progress_bar=False,
        )
    (record,) = [r for r in caplog.records if "max_sequence_length" in r.getMessage()]
    assert "28 tokens, the last 12 dropped" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dit_rt"):
        _generate(pipe, seed=0, guidance_scale=1.0)
    assert not caplog.records


def test_saving_a_latents_only_output_says_so(pipe, tmp_path):
    out = _generate(pipe, seed=0, output_type="latents")
    with pytest.raises(ValueError, match=r"latents only \(output_type='latents'\).*output_type='frames'"):
        out.save(tmp_path / "x.gif")


# ------------------------------------------------------------------------------------- 6. seed and metadata


def test_seed_is_drawn_reported_and_reproducible(pipe):
    a = _generate(pipe)
    assert isinstance(a.seed, int) and a.metadata["seed"] == a.seed
    b = _generate(pipe, seed=a.seed)
    assert b.seed == a.seed and torch.equal(a.frames, b.frames)
    assert _generate(pipe, latents=a.latents.new_zeros(a.latents.shape)).seed is None


def test_metadata_records_the_request(pipe, tiny):
    out = _generate(pipe, seed=7, guidance_scale=3.0)
    m = out.metadata
    assert m["prompt"] == "a cat" and m["seed"] == 7 and m["model"] == str(tiny)
    assert (m["height"], m["width"], m["num_frames"], m["num_inference_steps"]) == (32, 48, 5, 2)
    assert m["guidance_scale"] == 3.0 and m["options"]["attention"] == "auto"


def _png_text(path: Path) -> dict[str, str]:
    data, pos, text = path.read_bytes(), 8, {}
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(kind + body)
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            text[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + n
    return text


def _gif_comments(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data[:6] == b"GIF89a" and data[10] & 0x80
    pos, comments = 13 + 3 * 2 ** ((data[10] & 7) + 1), []
    while data[pos] == 0x21:  # extensions before the first image
        label, pos, body = data[pos + 1], pos + 2, b""
        while data[pos]:
            body += data[pos + 1 : pos + 1 + data[pos]]
            pos += 1 + data[pos]
        pos += 1
        if label == 0xFE:
            comments.append(body.decode("ascii"))
    return comments


def _mp4_comment(path: Path) -> str:
    import imageio_ffmpeg

    run = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
        capture_output=True,
        text=True,
    )
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("comment=")]
    return re.sub(r"\\(.)", r"\1", line.removeprefix("comment="))  # ffmetadata escapes = ; # \ newline


def test_metadata_is_written_into_every_format(pipe, tmp_path):
    from PIL import Image

    out = _generate(pipe, seed=3, num_frames=1)
    out.metadata["prompt"] = "un chat 猫 = ; # \\ fin"  # characters each format escapes its own way
    want = json.loads(json.dumps(out.metadata))
    (png,) = out.save(tmp_path / "x.png")
    assert json.loads(_png_text(png)["Comment"]) == want
    (gif,) = out.save(tmp_path / "x.gif")
    assert [json.loads(c) for c in _gif_comments(gif)] == [want]
    assert json.loads(Image.open(gif).info["comment"]) == want  # Pillow reads it too
    (mp4,) = out.save(tmp_path / "x.mp4")
    assert json.loads(_mp4_comment(mp4)) == want
    (webp,) = out.save(tmp_path / "x.webp")
    assert json.loads(Image.open(webp).getexif()[0x010E]) == want  # EXIF ImageDescription
    (bare,) = out.save(tmp_path / "bare.png", metadata={})
    assert "Comment" not in _png_text(bare)


def test_batch_metadata_is_per_item(pipe, tmp_path):
    out = pipe.generate(
        ["a cat", "a dog"], height=32, width=48, num_frames=1, num_inference_steps=1, progress_bar=False
    )
    (path,) = out.save(tmp_path / "dog.png", index=1)
    assert json.loads(_png_text(path)["Comment"])["prompt"] == "a dog"


def test_cli_prints_the_seed(tiny, tmp_path, capsys):
    assert (
        main(["generate", "--model", str(tiny), "--prompt", "x", *SMALL, "-o", str(tmp_path / "x.png")]) == 0
    )
    (seed,) = re.findall(r"^seed: (\d+)$", capsys.readouterr().out, re.M)
    assert json.loads(_png_text(tmp_path / "x_00000.png")["Comment"])["seed"] == int(seed)


# ------------------------------------------------------------------------- 7. --version, -v and the defaults


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dit-rt {dit_rt.__version__}"


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_logs_backend_and_times(tiny, tmp_path, capsys, monkeypatch, where):
    from dit_rt.ops.attention import registry

    monkeypatch.setattr(registry, "_RESOLVED", {})  # each choice is logged once per process: forget them
    args = ["generate", "--model", str(tiny), "--prompt", "x", *SMALL, "-o", str(tmp_path / "x.gif")]
    assert main(["-v", *args] if where == "before" else [*args, "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "attention backend: sdpa" in err
    assert re.search(r"loaded .* in \d+\.\d s", err) and re.search(r"generated in \d+\.\d s", err)
    assert re.search(r"time: text \d+\.\d\d s, steps \d+\.\d\d s, decode \d+\.\d\d s", err)


def test_quiet_by_default(tiny, tmp_path, capsys):
    assert (
        main(["generate", "--model", str(tiny), "--prompt", "x", *SMALL, "-o", str(tmp_path / "x.gif")]) == 0
    )
    assert "attention backend" not in capsys.readouterr().err


def test_models_and_help_show_defaults(capsys):
    assert main(["models"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("wan2.1-t2v-1.3b "))
    assert row.split()[:7] == ["wan2.1-t2v-1.3b", "yes", "t2v", "480x832", "81", "50", "5.0"]
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS denoising steps (default: the model's catalog default)" in help_text
    assert "(default: auto)" in help_text and "--cache-model ALIAS" in help_text


# ------------------------------------------------------------------------------------------------ 8. README


def _readme_command(prefix: str) -> list[str]:
    text = README.read_text()
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert lines, f"README has no command starting with {prefix!r}"
    return shlex.split(lines[0].split("#")[0])


def test_readme_demo_folder_command_runs(tmp_path, capsys):
    from dit_rt.demo import TINY_MODEL

    argv = _readme_command('dit-rt generate --model "$TINY"')
    argv = argv[1:]
    assert argv[argv.index("--model") + 1] == "$TINY"  # the shipped model's folder, as the README sets it
    argv[argv.index("--model") + 1] = str(TINY_MODEL)
    argv[argv.index("-o") + 1] = str(tmp_path / "small.gif")
    assert main(argv) == 0
    assert (tmp_path / "small.gif").is_file()


def test_readme_states_what_users_need():
    text = README.read_text()
    install = text[text.index("## Install") : text.index("## Demo")]
    assert '".[test,video]"' in install and "GPUs only" in install and '| `attention="fa3-fp8"` |' in install
    for needed in ("dit_rt.demo.TINY_MODEL", "one file per frame", "--cache-model", "seed: 1234", "--prompt"):
        assert needed in text, needed


def test_demo_prints_the_checkpoint_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIT_RT_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--steps", "1", "-o", str(tmp_path / "d.gif")]) == 0
    out = capsys.readouterr().out
    from dit_rt.demo import TINY_MODEL

    assert f"checkpoint: {TINY_MODEL}" in out and "seed: 0" in out


def test_cli_offload_resident_flag(tiny, tmp_path, capsys):
    from dit_rt.cli import _runtime_options, build_parser

    base = ["generate", "--model", "m", "--prompt", "p", "-o", "x.gif", "--offload"]
    a = build_parser().parse_args([*base, "block", "--offload-resident-gib", "1.5"])
    assert _runtime_options(a)["offload"] == dict(name="block", resident_gib=1.5)
    a = build_parser().parse_args([*base, "block", "--offload-resident-gib", "auto"])
    assert _runtime_options(a)["offload"] == dict(name="block", resident_gib="auto")
    assert _runtime_options(build_parser().parse_args([*base, "model"]))["offload"] == "model"
    rc = main(
        ["generate", "--model", str(tiny), "--prompt", "x", *SMALL, "-o", str(tmp_path / "x.gif")]
        + ["--offload-resident-gib", "2"]
    )
    assert rc == 2 and "--offload-resident-gib needs --offload block" in _one_line_error(
        capsys.readouterr().err
    )
    out = tmp_path / "auto.gif"  # on the CPU "auto" has no card to size against: nothing kept, still runs
    rc = main(
        ["generate", "--model", str(tiny), "--prompt", "x", *SMALL, "-o", str(out), "--offload", "block"]
        + ["--offload-resident-gib", "auto"]
    )
    assert rc == 0 and out.is_file()
