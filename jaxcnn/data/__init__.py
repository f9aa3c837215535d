"""Datasets: what a run trains and evaluates on (`pipeline`, which chooses among the rest).

TFDS preparation and reading (`prepare`, `tfds_data`, `decoded_index`), the user's own images
(`image_folder`), synthetic data (`synthetic`), device-resident splits (`device_data`) with batch
preprocessing under `jit` (`augment`), and Grain streaming from the host (`streaming`, with
`image_ops` for resizing).
"""
