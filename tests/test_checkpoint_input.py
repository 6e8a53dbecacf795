"""Bad input where an sslray checkpoint is expected (`sslray probe/eval/export --checkpoint`, the
finetune workers): an image, a truncated state.pt or a plain state_dict gets one line naming the
file and what was expected, not a pickle/zip traceback or ``error: config``. A folder holding the
checkpoints of several runs (the storage root, a run beside its ``--restart``-moved
``<name>.old-<time>``) is refused, naming the runs, instead of exporting another run's backbone."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import drop_ray_lines
from sslray.cli import main
from sslray.config import ConfigError
from sslray.export import read_weights
from sslray.raytrain.evaluate import find_state, load_checkpoint, read_checkpoint
from sslray.storage import newest_file

from test_data_checks import to_beton, tree
from test_export import SMALL, _checkpoint


@pytest.fixture
def bad(tmp_path) -> dict:
    """A PNG, the first half of a real state.pt, and a timm-style plain state_dict."""
    _checkpoint(tmp_path, "smoke", SMALL, epoch=1)
    real = tmp_path / "run" / "epoch_0001" / "state.pt"
    png = tmp_path / "pic.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(png)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    sd = tmp_path / "sd.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), sd)
    return {"png": png, "trunc": trunc, "sd": sd, "real": real}


NOT_CKPT = (r"is not an sslray checkpoint, a state\.pt written by sslray pretrain \((UnpicklingError|RuntimeError"
            r"|its bytes are neither a torch file nor a safetensors one)")


@pytest.mark.parametrize("which", ["png", "trunc"])
def test_a_file_that_is_no_checkpoint_is_named(bad, which):
    path = bad[which]
    with pytest.raises(ValueError, match=rf"^{path}.*{NOT_CKPT}"):
        read_checkpoint(path)
    with pytest.raises(ValueError, match=rf"^{path}.*{NOT_CKPT}"):
        load_checkpoint(path, torch.device("cpu"))  # probe, export and the finetune workers


def test_a_plain_state_dict_is_pointed_at_init_weights(bad):
    with pytest.raises(ValueError, match=rf"^{bad['sd']} holds no sslray config \(a plain state_dict\? "
                                         r"give it to --init-weights"):
        load_checkpoint(bad["sd"], torch.device("cpu"))
    torch.save({"config": {}, "epoch": 1}, bad["sd"])
    with pytest.raises(ValueError, match=rf"^{bad['sd']} holds no 'model' state_dict"):
        read_checkpoint(bad["sd"])
    torch.save({"config": {"optim": {"bas_lr": 1}}, "model": {}}, bad["sd"])
    with pytest.raises(ConfigError, match=rf"^{bad['sd']}: the checkpoint's config: .*optim\.bas_lr"):
        read_checkpoint(bad["sd"])
    # the real checkpoint still reads, and --init-weights still takes all three kinds of file it took
    cfg, state = read_checkpoint(bad["real"])
    assert cfg.model.backbone == SMALL["model.backbone"] and state["epoch"] == 1
    assert read_weights(bad["real"])[0] and read_weights(bad["real"].parent)[1] == bad["real"]
    with pytest.raises(ValueError, match=rf"model.init_weights: {bad['png']} is not a weights file sslray can read"):
        read_weights(bad["png"])


@pytest.fixture
def betons(tmp_path) -> tuple[str, str]:
    src = tree(tmp_path / "src" / "train", {"cat": 2, "dog": 2}).parent
    tree(src / "val", {"cat": 1, "dog": 1})
    return to_beton(src, tmp_path / "train.beton", split="train"), to_beton(src, tmp_path / "val.beton", split="val")


@pytest.mark.parametrize("which", ["png", "trunc", "sd"])
def test_cli_commands_give_one_line_naming_the_file(bad, betons, tmp_path, capsys, which):
    path = str(bad[which])
    expect = "holds no sslray config" if which == "sd" else "is not an sslray checkpoint"
    runs = {
        "export": ["export", path, str(tmp_path / "out")],
        "probe": ["probe", "--checkpoint", path, "--train", betons[0], "--val", betons[1], "--gpu", "false"],
        "eval": ["eval", "--checkpoint", path, "--protocol", "knn", "--train", betons[0], "--val", betons[1],
                 "--gpu", "false", "--no-log", "--no-cache"],  # FeatureStore
        "eval (the checkpoint's own data)": ["eval", "--checkpoint", path, "--protocol", "knn", "--no-log"],  # runner
    }
    for what, argv in runs.items():
        assert main(argv) == 2, what
        err = drop_ray_lines(capsys.readouterr().err).strip()
        cmd = argv[0]
        assert err.startswith(f"sslray {cmd}: error: {path} {expect}") and "\n" not in err, (what, err)
    assert not (tmp_path / "out").exists()


def _runs(root, layout: dict[str, list[str]]) -> None:
    """``root/<run>/<checkpoint>/state.pt`` (each a distinct byte string), with each run's sslray_run.json."""
    for run, ckpts in layout.items():
        for c in ckpts:
            (root / run / c).mkdir(parents=True)
            (root / run / c / "state.pt").write_bytes(f"{run}/{c}".encode())
        (root / run / "sslray_run.json").write_text(json.dumps({"run_id": run}))


def test_a_folder_of_several_runs_is_refused_naming_them(tmp_path):
    root = tmp_path / "st2"
    _runs(root, {"runA": ["epoch_0008", "epoch_0009"], "runB.old-2026": ["epoch_0012"]})
    pattern = (rf"^{root} holds the checkpoints of 2 runs: runA, runB\.old-2026; give one run folder "
               rf"\(such as {root}/runA\)")
    with pytest.raises(ValueError, match=pattern):
        find_state(root)
    with pytest.raises(ValueError, match=pattern):
        newest_file(str(root), "state.pt")  # the same rule where the runs are remote (s3://)
    with pytest.raises(ValueError, match=rf"^model\.init_weights: {root} holds the checkpoints of 2 runs"):
        read_weights(root)
    # a run folder, a checkpoint folder or a state.pt work as before
    assert find_state(root / "runA") == root / "runA" / "epoch_0009" / "state.pt"
    assert find_state(root / "runB.old-2026") == root / "runB.old-2026" / "epoch_0012" / "state.pt"
    assert find_state(root / "runA" / "epoch_0008") == root / "runA" / "epoch_0008" / "state.pt"
    assert find_state(root / "runA" / "epoch_0008" / "state.pt") == root / "runA" / "epoch_0008" / "state.pt"
    assert newest_file(str(root / "runA"), "state.pt") == str(root / "runA" / "epoch_0009" / "state.pt")
    # a run whose checkpoints sit one folder down (run_local's layout: <run>/checkpoints/epoch_*) is one run
    _runs(tmp_path / "nested", {"checkpoints": ["epoch_0001", "epoch_0002"]})
    assert find_state(tmp_path / "nested").parent.name == "epoch_0002"
    assert newest_file(str(tmp_path / "nested"), "state.pt").endswith("checkpoints/epoch_0002/state.pt")


def test_many_runs_are_listed_up_to_ten(tmp_path):
    _runs(tmp_path, {f"run{i:02d}": ["epoch_0001"] for i in range(13)})
    with pytest.raises(ValueError, match=r"13 runs: run00, run01, .*, run09 \(\+3 more\); give one"):
        find_state(tmp_path)


def test_export_of_the_storage_root_writes_nothing(tmp_path, capsys):
    """`sslray export st2 exp3` exported runB.old-2026's backbone (the highest checkpoint name) silently."""
    for run, epoch in (("runA", 9), ("runB.old-2026", 12)):
        _checkpoint(tmp_path / "st2" / run, "smoke", SMALL, epoch=epoch)  # <st2>/<run>/run/epoch_*/state.pt
    assert main(["export", str(tmp_path / "st2"), str(tmp_path / "exp3")]) == 2
    err = drop_ray_lines(capsys.readouterr().err)
    assert err.startswith(f"sslray export: error: {tmp_path / 'st2'} holds the checkpoints of 2 runs: runA/run, "
                          "runB.old-2026/run; give one run folder")
    assert not (tmp_path / "exp3").exists()
    assert main(["export", str(tmp_path / "st2" / "runA" / "run"), str(tmp_path / "exp3")]) == 0
    assert json.loads((tmp_path / "exp3" / "backbone.json").read_text())["epoch"] == 9


def test_a_remote_folder_of_several_runs_is_refused_before_any_copy(s3_server, tmp_path, monkeypatch):
    from sslray import storage

    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    root = s3_server.bucket("several") + "/runs"
    for key in ("runA/epoch_0009/state.pt", "runA/epoch_0008/state.pt", "runB.old-2026/epoch_0012/state.pt"):
        storage.upload(_file(tmp_path, key), f"{root}/{key}")
    with pytest.raises(ValueError, match=rf"^{root} holds the checkpoints of 2 runs: runA, runB\.old-2026; "
                                         rf"give one run folder \(such as {root}/runA\)"):
        find_state(root)
    assert not (tmp_path / "cache").exists()  # nothing fetched
    assert find_state(f"{root}/runA").read_bytes() == b"runA/epoch_0009/state.pt"
    assert newest_file(f"{root}/runB.old-2026", "state.pt") == f"{root}/runB.old-2026/epoch_0012/state.pt"


def _file(tmp_path, text: str):
    f = tmp_path / "up" / text
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(text.encode())
    return f


def test_other_bytes_given_as_weights_are_named_as_such(tmp_path):
    """Any non-torch bytes in a .pt file came back as "(KeyError: 174812789)": torch's old-format reader
    takes the first bytes as a magic number. The message says what the file is not."""
    junk = tmp_path / "bad.pt"
    junk.write_bytes(b"\x80\x02J\x15\xc2k\x0b" + bytes(range(256)) * 4)  # a pickled int, then noise
    with pytest.raises(ValueError, match=r"model\.init_weights: .*bad\.pt is not a weights file sslray can read "
                                         r"\(its bytes are neither a torch file nor a safetensors one\)"):
        read_weights(junk)
