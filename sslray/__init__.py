"""sslray: self-supervised visual pretraining on FFCV data with Ray Train, Ray Tune and MLflow."""

__version__ = "0.1.0"
