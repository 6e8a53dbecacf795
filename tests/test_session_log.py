"""Worker progress lines reach the driver once: RaySession.log bypasses Ray Train's print patch,
which sends a plain print() both to Train's logger and, where stdout is wrapped, to stdout."""

from __future__ import annotations

import builtins
import io
import sys

from sslray.raytrain.session import RaySession


def test_rank0_log_goes_to_the_process_stdout_once(monkeypatch):
    from ray.train.v2._internal.logging.patch_print import redirected_print

    session = RaySession.__new__(RaySession)  # no Ray context needed for log()
    session.rank = 0
    monkeypatch.setattr(builtins, "print", redirected_print)  # what Ray Train installs in workers
    process_out, wrapped = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "__stdout__", process_out)
    monkeypatch.setattr(sys, "stdout", wrapped)  # Ray wraps a worker's stdout
    session.log("epoch 1 step 10 loss 4.2")
    assert process_out.getvalue() == "epoch 1 step 10 loss 4.2\n"
    assert wrapped.getvalue() == ""  # not teed a second time

    session.rank = 1
    session.log("never")
    assert "never" not in process_out.getvalue()
