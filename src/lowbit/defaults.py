"""The defaults that the command line and the Python API share, in one place.

Sized for a CPU: 16 calibration windows and 16 evaluation windows of 512 tokens take minutes on
two cores for a 135M model. Raise them for publishable numbers (``--samples 128``,
``--eval-windows 64``).
"""

CALIB_SAMPLES = 16  # calibration windows
CALIB_SEQ_LEN = 512  # tokens per calibration window
SEED = 0  # seed of the calibration draw
EVAL_WINDOWS = 16  # evaluation windows
EVAL_SEQ_LEN = 512  # tokens per evaluation window
BATCH_SIZE = 4  # sequences per forward pass
