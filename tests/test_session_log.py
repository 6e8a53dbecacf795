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


def test_trains_per_report_echo_is_dropped_and_its_warnings_kept():
    """Ray Train's logger for ``ray.train.report`` is named by its file path; quieting must reach the
    very logger object that module logs with, or the ~1.5 kB metrics echo per rank and epoch stays."""
    import logging

    from ray.train.v2._internal.execution import context

    from sslray.raytrain.session import quiet_report_echo

    before = context.logger.level
    try:
        context.logger.setLevel(logging.INFO)  # as in a worker, whose root logger Ray sets to INFO
        assert context.logger.isEnabledFor(logging.INFO)
        quiet_report_echo()
        assert not context.logger.isEnabledFor(logging.INFO)
        assert context.logger.isEnabledFor(logging.WARNING)
    finally:
        context.logger.setLevel(before)
