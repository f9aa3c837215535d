"""Training progress for people: a live bar on a terminal, periodic log lines elsewhere."""

import contextlib
import sys
import time


def format_duration(seconds: float) -> str:
  """'1h02m', '3m05s' or '12.3s'."""
  if seconds >= 3600:
    return f'{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m'
  if seconds >= 60:
    return f'{int(seconds // 60)}m{int(seconds % 60):02d}s'
  return f'{seconds:.1f}s'


class Progress:
  """Shows steps/s, examples/s and the time left.

  On a terminal this is a tqdm bar advanced as steps are dispatched; elsewhere (a log file, CI) it
  prints one line per report. Rates come from the trainer, which measures them between points
  where the device has caught up, so they are true device throughput, not dispatch speed.
  """

  def __init__(self, total_steps: int, start_step: int, enabled: bool = True,
               interactive: bool | None = None):
    self.total_steps = total_steps
    self.enabled = enabled
    self.interactive = sys.stdout.isatty() if interactive is None else interactive
    self._bar = None
    if enabled and self.interactive:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=start_step, unit='step', dynamic_ncols=True,
                       smoothing=0.1)

  def advance(self, steps: int) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def report(self, step: int, loss: float, steps_per_sec: float, examples_per_sec: float) -> None:
    """Shows the latest training loss and throughput."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.set_postfix_str(f'loss {loss:.4f}, {examples_per_sec:,.0f} ex/s', refresh=False)
      return
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float('inf')
    self.message(f'step {step}/{self.total_steps} ({100 * step / self.total_steps:.1f}%)  '
                 f'loss {loss:.4f}  {steps_per_sec:.1f} steps/s  {examples_per_sec:,.0f} ex/s  '
                 f'ETA {format_duration(eta) if eta != float("inf") else "?"}')

  def message(self, text: str) -> None:
    """Prints a line without breaking the bar."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class Stopwatch:
  """Accumulates the seconds spent in named phases (train, eval, compile, ...)."""

  def __init__(self):
    self.totals: dict[str, float] = {}

  def add(self, phase: str, seconds: float) -> None:
    self.totals[phase] = self.totals.get(phase, 0.0) + seconds

  @contextlib.contextmanager
  def timed(self, phase: str):
    """Adds the time spent inside the `with` block to `phase`."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self.add(phase, time.perf_counter() - start)
