"""Methods from outside sslray (``method.plugins``): the example plugin of docs/methods.md, written to a
folder of its own and imported by name, is checked, listed, built, trained (one process, then one Ray
worker that has to import it too) and re-loaded from its checkpoint by a process that had not imported it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from sslray.config import ConfigError, load_config
from sslray.raytrain.methods import METHODS, check_method_config, create_method

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
PACKAGE = "plugtest_lab"  # a name no environment has installed
MODULE = f"{PACKAGE}.ssl_methods"
NAME = "annealedclr"  # what the example registers
TINY = ["model.backbone=resnet10t", "model.cifar_stem=false", "model.proj_hidden_dim=32", "model.proj_out_dim=16"]


def forget_plugin() -> None:
    """The state of a process that never imported the plugin: no registry entry, no module."""
    if NAME in METHODS:
        METHODS.unregister(NAME)
    for mod in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[mod]


@pytest.fixture
def plugin(tmp_path, monkeypatch) -> Path:
    """docs/methods.md's example as ``plugtest_lab/ssl_methods.py`` in a folder on ``sys.path``; the
    registry and ``sys.modules`` are left as they were (other tests compare the registry to the
    built-in table)."""
    code = re.search(r"## A plugin\n.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    folder = tmp_path / "plugins"
    (folder / PACKAGE).mkdir(parents=True)
    (folder / PACKAGE / "__init__.py").write_text("")
    (folder / PACKAGE / "ssl_methods.py").write_text(code)
    monkeypatch.syspath_prepend(str(folder))
    forget_plugin()
    yield folder
    forget_plugin()


def plugin_cfg(*extra):
    return load_config("smoke", [f"method.name={NAME}", f"method.plugins=[{MODULE}]", *TINY, *extra])


def test_config_names_plugin_modules_and_checks_their_methods(plugin):
    cfg = plugin_cfg("method.params.t_end=0.25")
    assert cfg.method.plugins == (MODULE,)
    check_method_config(cfg)  # imports the module: the method and its params are known before Ray starts
    assert NAME in METHODS and METHODS.get(NAME).family == "contrastive"
    assert load_config("smoke", [f"method.plugins={MODULE},json"]).method.plugins == (MODULE, "json")

    with pytest.raises(ValueError, match=r"method.params.nope.* accepts: t_end"):
        check_method_config(plugin_cfg("method.params.nope=1"))
    forget_plugin()
    with pytest.raises(ConfigError, match=rf"'method.name': unknown method '{NAME}'"):
        check_method_config(load_config("smoke", [f"method.name={NAME}"]))  # not named in method.plugins

    torch.manual_seed(0)
    model = create_method(cfg)
    assert type(model).__module__ == MODULE and float(model.t_end) == 0.25
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    loss = model(views)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.projector.net[0].weight.grad is not None
    model.on_step(9, 10)  # the last step: the temperature has reached t_end
    assert float(model.temperature) == pytest.approx(0.25)


def test_a_tune_space_over_a_plugin_methods_params_is_checked_against_its_builder(plugin):
    """`sslray tune --space method.params.t_end=...` on a plugin method: the search space is checked
    before any trial, so the plugin must be imported there too (it was looked up unimported)."""
    from sslray.tune.space import check_space, parse_space

    forget_plugin()
    check_space(parse_space(["method.params.t_end=uniform(0.1, 0.5)"]), plugin_cfg())
    with pytest.raises(ConfigError, match="t_end"):
        check_space(parse_space(["method.params.nope=uniform(0.1, 0.5)"]), plugin_cfg())


def test_study_and_views_find_a_plugin_method(plugin):
    """`sslray study --methods annealedclr ... method.plugins=[...]` and `sslray views --method annealedclr`
    build the method's config through the plugins it names (they looked the registry up unimported)."""
    from sslray.raytrain.methods import recipe_config
    from sslray.study import method_config

    forget_plugin()
    cfg = method_config(NAME, None, [f"method.plugins=[{MODULE}]", *TINY])
    assert cfg.method.name == NAME and cfg.views.preset == METHODS.get(NAME).default_views
    assert recipe_config(NAME, "smoke", [f"method.plugins=[{MODULE}]"]).views.preset == "simclr"  # the recipe's
    assert recipe_config("byol", None, ["views.preset=simclr"]).views.preset == "simclr"  # an override wins
    forget_plugin()
    with pytest.raises(KeyError, match=f"unknown method .{NAME}."):
        recipe_config(NAME)


def test_a_fine_tune_of_a_plugin_checkpoint_imports_it_and_passes_its_folder_to_workers(plugin, tmp_path,
                                                                                       monkeypatch):
    """`sslray eval --protocol finetune` of a plugin run: the fine-tune's Train workers rebuild the method
    from the checkpoint, so they get the plugin's folder as pretraining's workers do; the checkpoint's
    tensors are not read for it (mmap)."""
    import ray
    import ray.train.torch

    from sslray.raytrain import finetune, trainer

    state = tmp_path / "state.pt"
    torch.save({"config": {"method": {"name": NAME, "plugins": [MODULE]}}, "model": {"w": torch.zeros(3)}}, state)
    assert finetune.saved_plugins(str(state)) == (MODULE,)
    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(*a, run_config=None, **k):
        seen["env"] = run_config.worker_runtime_env
        raise Stop

    monkeypatch.setattr(trainer, "ensure_ray", lambda *a, **k: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("C", (), {"runtime_env": {}})())
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", fake_trainer)
    forget_plugin()
    with pytest.raises(Stop):
        settings = finetune.FinetuneSettings(storage=str(tmp_path))
        finetune.run_finetune(str(state), "train", "val", "pretrained", settings)
    assert NAME in METHODS and seen["env"]["env_vars"]["PYTHONPATH"].startswith(str(plugin))


def test_plugin_errors_name_the_key_and_module(plugin, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"config key 'method.plugins': no module named 'no_such_lab_xyz'.*"
                                          r"importable .* every Ray worker"):
        check_method_config(load_config("smoke", ["method.plugins=[no_such_lab_xyz.methods]"]))
    with pytest.raises(ConfigError, match=rf"no module named '{PACKAGE}.nope'"):
        check_method_config(load_config("smoke", [f"method.plugins={PACKAGE}.nope"]))
    with pytest.raises(ConfigError, match=r"'method.plugins': 'plugins/lab.py' is not a module name"):
        load_config("smoke", ["method.plugins=plugins/lab.py"])

    # The plugin's own failures: a missing dependency and a bug both name the module, with its traceback.
    (plugin / PACKAGE / "needs_dep.py").write_text("import not_installed_dep_xyz\n")
    (plugin / PACKAGE / "buggy.py").write_text("1 / 0\n")
    with pytest.raises(ConfigError, match=rf"importing '{PACKAGE}.needs_dep' failed: No module named "
                                          r"'not_installed_dep_xyz'"):
        check_method_config(load_config("smoke", [f"method.plugins={PACKAGE}.needs_dep"]))
    with pytest.raises(ConfigError, match=rf"importing '{PACKAGE}.buggy' failed: ZeroDivisionError") as e:
        check_method_config(load_config("smoke", [f"method.plugins={PACKAGE}.buggy"]))
    assert isinstance(e.value.__cause__, ZeroDivisionError)

    # A plugin taking a built-in's name is refused, naming both definitions.
    (plugin / PACKAGE / "clash.py").write_text(
        "from sslray.raytrain.methods import register_method\n\n\n"
        "@register_method('SimCLR')\ndef build(cfg, backbone, feat_dim):\n    return None\n")
    with pytest.raises(ConfigError, match=r"method 'SimCLR' is registered twice: by "
                                          rf"sslray.raytrain.methods.simclr.build_simclr and {PACKAGE}.clash.build"):
        check_method_config(load_config("smoke", [f"method.plugins={PACKAGE}.clash"]))
    assert METHODS.get("simclr").__module__ == "sslray.raytrain.methods.simclr"


def test_a_re_imported_plugin_registers_again(plugin):
    import importlib

    first = importlib.import_module(MODULE)
    importlib.reload(first)  # a notebook's reload: the same definition replaces itself
    assert METHODS.get(NAME) is first.build_annealedclr


def test_methods_listing_adds_plugins_only_when_asked(plugin, capsys):
    from sslray.cli import main
    from sslray.methodinfo import FAMILIES, method_lines

    plain = method_lines()
    assert [line.split()[0] for line in plain] == sorted(FAMILIES)
    lines = method_lines([MODULE])
    assert lines[: len(plain)] == plain
    assert lines[len(plain):] == [f"{NAME:14s} {'contrastive':16s} {'-':11s} plugin {MODULE}"]
    forget_plugin()
    assert main(["methods", "--plugins", MODULE]) == 0  # `sslray methods --plugins mylab.ssl_methods`
    assert capsys.readouterr().out.splitlines() == lines


@pytest.mark.slow
def test_plugin_trains_locally_and_its_checkpoint_reloads_in_a_fresh_process(plugin, cifar_small, tmp_path):
    from sslray.raytrain.evaluate import load_checkpoint
    from sslray.raytrain.loop import run_local

    cfg = plugin_cfg(f"data.train={cifar_small['train']}", "data.val=", "ray.num_workers=1", "train.epochs=1",
                     "train.max_steps_per_epoch=2", "method.params.t_end=0.1")
    last, session = run_local(cfg, str(tmp_path / "ckpt"))
    assert last["step"] == 2 and torch.isfinite(torch.tensor(last["loss"]))

    forget_plugin()  # what probe/eval/export see in a new process: only the checkpoint's config names it
    got_cfg, model, state = load_checkpoint(tmp_path / "ckpt", torch.device("cpu"))
    assert got_cfg.method.plugins == (MODULE,) and type(model).__module__ == MODULE
    # on_step ran after each of the 2 steps of 2, and the checkpoint kept where the schedule was
    assert float(model.temperature) == pytest.approx(0.1) and int(state["step"]) == 2
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())


@pytest.mark.ray
@pytest.mark.slow
def test_plugin_trains_on_a_ray_worker_that_was_not_started_with_it(plugin, ray_cluster, cifar_small, tmp_path):
    """The session's Ray instance was started before the plugin's folder existed, so its workers can
    only find the module through the runtime env `pretrain` gives them (the folder it was imported from)."""
    from mlflow.tracking import MlflowClient

    from sslray.raytrain.evaluate import load_checkpoint
    from sslray.raytrain.trainer import pretrain

    cfg = plugin_cfg(f"data.train={cifar_small['train']}", "data.val=", "ray.num_workers=1", "train.epochs=1",
                     "train.max_steps_per_epoch=2", "data.batch_size=16", "data.train_subset=64",
                     "monitor.pictures=false", f"ray.storage={tmp_path / 'runs'}", "ray.name=plugin-run",
                     f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    res = pretrain(cfg)
    assert res.metrics["epoch"] == 1 and res.metrics["step"] == 2 and res.metrics["loss"] > 0
    run = MlflowClient(res.tracking_uri).get_run(res.run_id)
    assert run.data.params["method.plugins"] == f"['{MODULE}']" and run.data.tags["sslray.family"] == "contrastive"
    forget_plugin()
    _, model, _ = load_checkpoint(tmp_path / "runs" / "plugin-run", torch.device("cpu"))
    assert type(model).__module__ == MODULE
