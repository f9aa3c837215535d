"""A trace of a few training steps with `jax.profiler`, for TensorBoard's Profile tab or Perfetto.

`--config.profile_steps=N` traces the compiled train calls from the first one that starts at or
after step `profile_start_step` until at least N steps have run, and writes the trace into
`<workdir>/plugins/profile/<time>/` (`<workdir>/profile_process_<i>/...` for each process of a
multi-process run), where `tensorboard --logdir <workdir>` finds it. The window follows the
boundaries of the compiled calls rather than splitting one, so that profiling compiles nothing
that training would not.
"""

import os
import time
from collections.abc import Callable

import jax


def _trace_options() -> jax.profiler.ProfileOptions:
  """The device's work and XLA's host activity, without Python's function calls.

  JAX's Python tracer installs itself in every thread of the process as the trace starts and
  stops, which races with threads that end meanwhile (an asynchronous checkpoint's, a data
  worker's); CPython fixed that race in its own all-threads profiling only in 3.14.1
  (gh-137400). It is the likely cause of the one segfault seen in a profiled test run (CPython
  3.11, 2026-12-04). A profile of compiled train steps needs the device's timeline, and a crash
  would cost the run.
  """
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  return options


class ProfileWindow:
  """Starts and stops one `jax.profiler` trace around the train calls of the chosen steps.

  Used as a context manager around the training loop, so that a run that stops early (a signal,
  a diverged loss) still writes the trace it has.
  """

  def __init__(self, workdir: str, *, start_step: int, num_steps: int,
               report: Callable[[str], None] = print):
    self.log_dir = (workdir if jax.process_count() == 1
                    else os.path.join(workdir, f'profile_process_{jax.process_index()}'))
    self.start_step, self.num_steps, self.report = start_step, num_steps, report
    self.first_step: int | None = None  # The first traced step, while tracing.
    self.last_step: int | None = None  # The last step of the calls traced so far.
    self.done = num_steps == 0

  def before_call(self, step: int) -> None:
    """Called before the train call that starts at `step`."""
    if not self.done and self.first_step is None and step >= self.start_step:
      jax.profiler.start_trace(self.log_dir, profiler_options=_trace_options())
      self.first_step = step

  def after_call(self, step: int, state) -> float:
    """Called after dispatching the call that ends at `step`; ends the trace once it holds
    `num_steps` steps, and returns the seconds spent writing it (not training)."""
    if self.first_step is None:
      return 0.0
    self.last_step = step
    if step - self.first_step < self.num_steps:
      return 0.0
    jax.block_until_ready(state)  # The trace is to hold the device's work, not just its dispatch.
    start = time.perf_counter()
    self._stop()
    return time.perf_counter() - start

  def _stop(self, why: str = '') -> None:
    jax.profiler.stop_trace()
    if self.last_step is not None:  # None: the run stopped inside the window's first call.
      self.report(f'profiled steps {self.first_step + 1} to {self.last_step}{why} into '
                  f'{self.log_dir}/plugins/profile (tensorboard --logdir {self.log_dir}, '
                  'Profile tab)')
    self.first_step, self.done = None, True

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    if self.first_step is not None:  # The run ended (or stopped) inside the window.
      self._stop(f' (the run ended before {self.num_steps} steps)')
