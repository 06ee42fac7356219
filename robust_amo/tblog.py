"""TensorBoard logging of a training run (``logging.tensorboard: true`` or ``--tensorboard``).

Writes RUN/tb with: every numeric metric of metrics.jsonl per epoch (``epoch/KEY`` at step =
epoch; a list of numbers, such as ``delta_rel_size``, as ``epoch/KEY/0``, ``epoch/KEY/1``, ...)
except the constants of :data:`CONSTANT` (the size of the check is no curve), the training loss
every ``log_every`` steps (``train/loss`` at step = global step), and the resolved config as
text. TensorBoard is an optional extra (``pip install -e ".[tensorboard]"``); asking for it
without the package is a one-line error before training.
The training loop creates the writer on rank 0 only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .runs import TB_FOLDER as FOLDER

CONSTANT = frozenset({"epoch", "n", "check_examples"})
"""Keys of a metrics row that are not curves: the step itself and the check's size."""


class TensorBoardLog:
    """A thin writer over ``torch.utils.tensorboard.SummaryWriter`` (see the module docstring).

    Raises:
        ConfigError: the tensorboard package is not installed.
    """

    def __init__(self, run_dir: str | Path, config: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional extra
        except ImportError:
            raise ConfigError("logging.tensorboard needs the tensorboard package: pip install "
                              "-e \".[tensorboard]\" (or pip install tensorboard), or turn it "
                              "off", params=("logging.tensorboard",)) from None
        self.path = Path(run_dir) / FOLDER
        self.writer = SummaryWriter(log_dir=str(self.path))
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)

    def step(self, global_step: int, loss: float) -> None:
        """The training loss of one step."""
        self.writer.add_scalar("train/loss", loss, global_step)

    def epoch(self, metrics: dict[str, Any]) -> None:
        """Every finite numeric metric of one epoch's metrics.jsonl line but :data:`CONSTANT`."""
        epoch = int(metrics["epoch"])
        for k, v in metrics.items():
            if k in CONSTANT:
                continue
            # a list of numbers (one per perturbation point: delta_rel_size) is one curve each
            items = enumerate(v) if isinstance(v, list) else [(None, v)]
            for i, x in items:
                if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
                    self.writer.add_scalar(f"epoch/{k}" if i is None else f"epoch/{k}/{i}", x,
                                           epoch)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
