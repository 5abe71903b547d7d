"""Training: one engine (engine.py) that every stage script (train_*.py) hands its dataset and loss to."""

from trainer.args import build_parser, parse_args
from trainer.cli import run
from trainer.engine import Result, TrainingDiverged, lr_at, train
from trainer.stage import Stage, lm_loss

__all__ = ["Result", "Stage", "TrainingDiverged", "build_parser", "lm_loss", "lr_at", "parse_args", "run", "train"]
