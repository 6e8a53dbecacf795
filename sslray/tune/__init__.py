"""Ray Tune over Ray Train runs: search spaces, schedulers (ASHA by default), the trial function,
and the sweep driver that logs one MLflow parent run with a nested child run per trial.

See docs/tune.md. Ray is imported lazily: ``sslray.tune.space`` works without it.
"""
