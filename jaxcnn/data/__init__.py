"""Datasets: TFDS preparation and reading (`tfds_data`), device-resident splits (`device_data`),
and batch preprocessing under `jit` (`augment`)."""
