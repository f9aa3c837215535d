"""Where metrics go: one JSON object per line in metrics.jsonl, and TensorBoard event files.

Every record has `"step"` and scalars named `"<split>/<name>"` (`train/loss`, `test/accuracy`).
Only process 0 of a multi-host run writes; the others get a writer that drops everything.

TensorBoard files are written with the `tensorboard` package's own event writer, kept from
importing TensorFlow (tensorboardX would import PyTorch where it is installed: 2 s of start-up
and a second framework in the training process).
"""

import json
import os
import sys
import time
import types
from collections.abc import Mapping

from jaxcnn.errors import UserError

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Appends scalar records to `<workdir>/metrics.jsonl` and to TensorBoard event files."""

  def __init__(self, workdir: str, enabled: bool = True, purge_step: int | None = None):
    """`purge_step`: a resumed run logs again from this step; TensorBoard hides the older events
    of those steps (metrics.jsonl is truncated by the trainer)."""
    self._enabled = enabled
    self._jsonl = None
    self._events = None
    if not enabled:
      return
    # TensorBoard's writer imports TensorFlow (for tf.io.gfile) wherever it is installed: seconds
    # of start-up and TensorFlow in the training process. Its `notf` switch, which the
    # no-TensorFlow build of TensorBoard sets, makes it use its own file layer instead.
    sys.modules.setdefault('tensorboard.compat.notf', types.ModuleType('tensorboard.compat.notf'))
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    # pylint: enable=g-import-not-at-top
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a', encoding='utf-8')
    self._events = EventFileWriter(workdir, flush_secs=30)
    if purge_step is not None:
      self._events.add_event(event_pb2.Event(
          step=purge_step, wall_time=time.time(),
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes one record: `{"step": step, **scalars}`."""
    if not self._enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    values = [self._summary_pb2.Summary.Value(tag=name, simple_value=float(value))
              for name, value in scalars.items()]
    self._events.add_event(self._event_pb2.Event(
        step=int(step), wall_time=time.time(), summary=self._summary_pb2.Summary(value=values)))

  def close(self) -> None:
    """Flushes and closes both files (once: closing a closed writer does nothing)."""
    if self._enabled and not self._jsonl.closed:
      self._jsonl.close()
      self._events.close()


class DamagedMetrics(UserError):
  """A `metrics.jsonl` line that is not a record of a step (other than a last line cut short).

  Attributes:
    reason: which line, by its number in the file, and what is wrong with it.
  """

  def __init__(self, path: str, reason: str):
    self.reason = reason
    super().__init__(f'{path} is damaged: {reason}')


def read_metrics(workdir: str) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl`, in the order they were written, checked: each line
  a JSON object with an integer `step`, except a last line cut short, which is skipped (what a run
  killed mid-write, or still writing, leaves; a resumed run cuts it off).

  Raises:
    FileNotFoundError: there is no metrics file.
    DamagedMetrics: naming the first other line that is not a record of a step.
  """
  path = os.path.join(workdir, METRICS_FILE)
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
  records = []
  for number, line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      if number == lines[-1][0]:
        continue
      # By the line's number in the file: json's own message counts within the line.
      raise DamagedMetrics(path, f'line {number} is not JSON') from None
    if not (isinstance(record, dict) and isinstance(record.get('step'), int)):
      raise DamagedMetrics(path, f'line {number} is not a record of a step')
    records.append(record)
  return records
