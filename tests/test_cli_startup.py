"""`sslray --help`, `sslray methods` and every argparse error come back in well under a second: building
the parser imports no heavy library (torch, timm, scikit-learn, Ray, MLflow, FFCV take ~5 s together).
Each check runs in a fresh interpreter, since this test process may have imported them already."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "timm", "sklearn", "ray", "mlflow", "ffcv")
REPORT = f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"


def heavy_modules_after(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\n{REPORT}"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_build_parser_imports_no_heavy_library():
    assert heavy_modules_after("from sslray.cli import build_parser; build_parser()") == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["eval", "--help"], ["study", "--help"], ["export", "--help"],
                                  ["nosuch"], ["eval", "--checkpoint", "x"]])
def test_help_and_usage_errors_import_no_heavy_library(argv):
    code = ("import contextlib, io\nfrom sslray.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            f"    try:\n        main({argv!r})\n    except SystemExit:\n        pass")
    assert heavy_modules_after(code) == "[]"


def test_methods_command_imports_no_heavy_library_and_lists_the_registry():
    code = "from sslray.cli import main\nmain(['methods'])"
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\n{REPORT}"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    *printed, heavy = out.stdout.strip().splitlines()
    assert heavy == "[]"
    from sslray.raytrain.methods import METHODS

    assert [line.split()[:2] for line in printed] == [[name, METHODS.get(name).family] for name in METHODS.names()]


def test_torch_free_method_families_match_the_registry():
    from sslray.methodinfo import FAMILIES, recipes_by_method
    from sslray.raytrain.methods import METHODS

    from sslray.methodinfo import MULTICROP
    from sslray.raytrain.methods import multicrop_methods

    assert FAMILIES == {name: METHODS.get(name).family for name in METHODS.names()}
    assert MULTICROP == set(multicrop_methods())
    assert set(recipes_by_method()) <= set(METHODS.names())  # every recipe names a registered method
