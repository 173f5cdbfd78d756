"""The utilities layer: atomic files, label maps, logging, the command wrapper, process-group setup."""

from __future__ import annotations

import argparse
import json
import logging
import socket

import numpy as np
import pytest

from puzzlecam.errors import (
    CamStoreError,
    ConfigError,
    DiskError,
    PuzzleCamError,
    RunError,
    TrainingError,
    UsageError,
)
from puzzlecam.utils import files, labelmap
from puzzlecam.utils.cli import run_command
from puzzlecam.utils.distributed import init_distributed
from puzzlecam.utils.log import setup_logging
from puzzlecam.utils.net import free_port
from puzzlecam.utils.progress import ProgressBar

# ---------------------------------------------------------------------------------------------
# files


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.json"
    files.atomic_write_json(target, {"a": 1, "b": [1.5, float("nan")], "c": {"d": float("inf")}})
    assert json.loads(target.read_text()) == {"a": 1, "b": [1.5, None], "c": {"d": None}}
    files.atomic_write_text(target, "second\n")
    assert target.read_text() == "second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "out.bin"
    files.atomic_write_bytes(target, b"old")

    def fail_half_way(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(DiskError, match=r"no space left on .* while writing .*out.bin"):
        files.atomic_write(target, fail_half_way)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_stale_temporaries_are_recognised_and_removed(tmp_path):
    keep = [tmp_path / "a.npz", tmp_path / ".hidden", tmp_path / "b.tmp-1"]
    stale = [files.temporary_path(tmp_path / "a.npz"), tmp_path / ".x.tar.tmp-123"]
    for p in keep + stale:
        p.write_bytes(b"")
    assert all(files.is_temporary(p) for p in stale) and not any(files.is_temporary(p) for p in keep)
    removed = files.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)
    assert files.remove_stale_temporaries(tmp_path / "missing") == []


# ---------------------------------------------------------------------------------------------
# label maps


def test_label_png_round_trip_palette_and_determinism():
    labels = np.random.default_rng(0).integers(0, 21, (17, 23)).astype(np.uint8)
    labels[0, :5] = labelmap.IGNORE_INDEX
    data = labelmap.encode_label_png(labels)
    assert data == labelmap.encode_label_png(labels.copy())
    assert np.array_equal(labelmap.decode_label_png(data), labels)
    colours = labelmap.voc_colormap()
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    # The VOC devkit's colours: background black, aeroplane (1) dark red, person (15) pinkish, void cream.
    assert colours[0].tolist() == [0, 0, 0] and colours[1].tolist() == [128, 0, 0]
    assert colours[15].tolist() == [192, 128, 128] and colours[255].tolist() == [224, 224, 192]
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        labelmap.encode_label_png(np.zeros((2, 2, 3), np.uint8))


def test_decode_label_png_refuses_rgb_and_non_png():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="mode 'RGB'"):
        labelmap.decode_label_png(buf.getvalue())
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="TIFF")
    with pytest.raises(ValueError, match="TIFF"):
        labelmap.decode_label_png(buf.getvalue())


# ---------------------------------------------------------------------------------------------
# errors and the command wrapper


def test_error_classes_carry_their_exit_codes_and_builtin_bases():
    assert issubclass(ConfigError, UsageError) and issubclass(ConfigError, ValueError)
    assert issubclass(CamStoreError, UsageError) and issubclass(TrainingError, RunError)
    assert UsageError.exit_code == 2 and RunError.exit_code == 1
    assert issubclass(UsageError, PuzzleCamError) and issubclass(RunError, PuzzleCamError)


def _parser():
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("--what", default="ok")
    return p


@pytest.mark.parametrize(
    "raised,status,message",
    [
        (None, 0, None),
        (UsageError("--what 'x': expected ok"), 2, "error: --what 'x': expected ok"),
        (ConfigError("unknown config key 'a.b'"), 2, "error: unknown config key 'a.b'"),
        (TrainingError("diverged"), 1, "error: diverged"),
        (OSError(28, "No space left on device", "/runs/x"), 1, "error: no space left on "),
        (OSError(13, "Permission denied", "/runs/x"), 1, "error: [Errno 13] Permission denied: '/runs/x'"),
        (KeyboardInterrupt(), 130, "error: interrupted"),
    ],
)
def test_run_command_maps_outcomes_to_exit_codes(capsys, raised, status, message):
    def run(args):
        if raised is not None:
            raise raised

    assert run_command(_parser(), run, []) == status
    err = capsys.readouterr().err
    if message is None:
        assert err == ""
    else:
        assert message in err


def test_run_command_returns_the_status_of_run_and_shows_bugs():
    assert run_command(_parser(), lambda args: 3, []) == 3
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_command(_parser(), lambda args: 1 / 0, [])


def test_flags_may_follow_positional_overrides():
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("--force", action="store_true")
    p.add_argument("overrides", nargs="*")
    seen = {}
    assert run_command(p, lambda args: seen.update(vars(args)), ["a.b=1", "--force", "c.d=2"]) == 0
    assert seen["overrides"] == ["a.b=1", "c.d=2"] and seen["force"]


def test_bad_usage_exits_2_from_argparse(capsys):
    with pytest.raises(SystemExit) as exc:
        run_command(_parser(), lambda args: 0, ["--nope"])
    assert exc.value.code == 2 and "unrecognized arguments: --nope" in capsys.readouterr().err


def test_log_level_before_or_after_a_subcommand(capsys):
    def parser():
        p = argparse.ArgumentParser(prog="tool")
        sub = p.add_subparsers(dest="command", required=True)
        sub.add_parser("go")
        return p

    def run(args):
        logging.getLogger("puzzlecam.tool").info("hello")
        logging.getLogger("puzzlecam.tool").warning("careful")

    for argv in (["go"], ["--log-level", "warning", "go"], ["go", "--log-level", "warning"]):
        assert run_command(parser(), run, argv) == 0
        err = capsys.readouterr().err
        assert "warning: careful" in err
        assert ("hello" in err) == (argv == ["go"]), argv


def test_other_ranks_show_warnings_only_unless_asked(capsys, monkeypatch):
    log = logging.getLogger("puzzlecam.test")
    setup_logging("info", rank=1)
    log.info("progress")
    log.warning("a corrupt sample")
    assert capsys.readouterr().err == "[rank 1] warning: a corrupt sample\n"
    monkeypatch.setenv("PUZZLECAM_LOG_ALL_RANKS", "1")
    setup_logging("info", rank=1)
    log.info("progress")
    assert capsys.readouterr().err == "[rank 1] progress\n"
    setup_logging("info", rank=0)
    log.info("progress")
    assert capsys.readouterr().err == "progress\n"
    with pytest.raises(UsageError, match="log level 'loud'"):
        setup_logging("loud")


# ---------------------------------------------------------------------------------------------
# progress, ports, process groups


def test_progress_bar_is_not_drawn_off_a_terminal_or_when_disabled(capsys):
    for enabled in (True, False):
        with ProgressBar("work", 3, enabled=enabled, info=True) as bar:
            assert not bar.live  # pytest captures stderr: not a terminal
            bar.advance()
            bar.update(2, info="half")
    assert capsys.readouterr().err == ""


def test_free_port_can_be_bound_and_is_outside_the_ephemeral_range():
    from puzzlecam.utils.net import _ephemeral_low

    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1 and all(1024 <= p < _ephemeral_low() for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))


@pytest.mark.parametrize("spec,message", [("tpu", "expected cpu, cuda or cuda:N"), ("cuda:0", "CUDA|device")])
def test_a_bad_device_names_the_flag(spec, message):
    import torch

    if spec.startswith("cuda") and torch.cuda.is_available():
        spec, message = f"cuda:{torch.cuda.device_count()}", "CUDA device"
    with pytest.raises(UsageError, match=rf"--gpu '?{spec}'?: .*({message})"):
        init_distributed(spec, single_process_group=False, device_flag="--gpu")


def test_an_unlaunched_process_without_a_group_works_alone(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu", single_process_group=False)
    assert (info.rank, info.world_size, info.device.type, info.is_main) == (0, 1, "cpu", True)


def test_a_full_disk_is_one_message_and_leaves_nothing(small_disk):
    target = small_disk.path / "out.bin"
    files.atomic_write_bytes(target, b"old")
    with pytest.raises(DiskError, match=r"no space left on tmpfs \(mounted at .*disk\) while writing .*out.bin"):
        files.atomic_write_bytes(target, b"x" * (4 << 20))
    assert target.read_bytes() == b"old" and sorted(p.name for p in small_disk.path.iterdir()) == ["out.bin"]
    small_disk.make_read_only()
    with pytest.raises(DiskError, match=r"read-only file system tmpfs .*out.bin"):
        files.atomic_write_json(target, {"a": 1})
    assert target.read_bytes() == b"old"


def test_run_command_reports_a_full_disk_in_one_line(small_disk, capsys):
    small_disk.fill()

    def run(args):
        files.atomic_write_bytes(small_disk.path / "summary.json", b"x" * 65536)

    def raw_write(args):  # a write outside the atomic writers: the errno is all there is
        with open(small_disk.path / "log.txt", "wb") as f:
            f.write(b"x" * 65536)
            f.flush()

    assert run_command(_parser(), run, []) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no space left on tmpfs") and "summary.json" in err[0], err
    assert run_command(_parser(), raw_write, []) == 1
    assert capsys.readouterr().err.strip().splitlines() == ["error: [Errno 28] No space left on device"]


def test_a_module_run_with_python_m_logs_too(capsys):
    # Under `python -m puzzlecam.X` the module's logger is "__main__", outside the puzzlecam tree.
    setup_logging("info", rank=0)
    logging.getLogger("__main__").info("wrote 3 files")
    assert capsys.readouterr().err == "wrote 3 files\n"


def test_a_bad_pixel_bound_in_the_environment_is_bad_usage(capsys, monkeypatch):
    monkeypatch.setenv("PUZZLECAM_MAX_IMAGE_PIXELS", "lots")
    assert run_command(_parser(), lambda args: 0, []) == 2
    assert "PUZZLECAM_MAX_IMAGE_PIXELS='lots': expected a positive number of pixels" in capsys.readouterr().err


def test_every_package_of_the_tree_is_installed():
    # pyproject.toml lists the packages explicitly: a new subpackage must be added there too.
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "puzzlecam").rglob("__init__.py")}
    assert found | {"puzzlecam.kernels"} == listed
