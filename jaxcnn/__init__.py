"""jaxcnn: train and compare convolutional networks with JAX, Flax NNX and Optax.

The entry point is `jaxcnn.trainer.train_and_evaluate(config, workdir)`; `train.py` is its command
line. See README.md for the tour.
"""

__version__ = '0.1.0'
