"""Where metrics go: one JSON object per line in metrics.jsonl, and TensorBoard event files.

Every record has `"step"` and scalars named `"<split>/<name>"` (`train/loss`, `test/accuracy`).
Only process 0 of a multi-host run writes; the others get a writer that drops everything.
"""

import json
import os
from collections.abc import Mapping

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Appends scalar records to `<workdir>/metrics.jsonl` and to TensorBoard event files."""

  def __init__(self, workdir: str, enabled: bool = True, purge_step: int | None = None):
    """`purge_step`: a resumed run logs again from this step; TensorBoard hides older events of
    those steps (metrics.jsonl is truncated by the trainer)."""
    self._enabled = enabled
    self._jsonl = None
    self._tensorboard = None
    if enabled:
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a', encoding='utf-8')
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tensorboard = SummaryWriter(logdir=workdir, flush_secs=30, purge_step=purge_step)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes one record: `{"step": step, **scalars}`."""
    if not self._enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, float(value), int(step))

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """All records of `<workdir>/metrics.jsonl`, in the order they were written."""
  path = os.path.join(workdir, METRICS_FILE)
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
