"""Curriculum stage: 9-second videos.

    python -m ttt_jax.train --config=configs/tom_jerry_9s.py:tiny --workdir=workdirs/9s
    python -m ttt_jax.train --config=configs/tom_jerry_9s.py --workdir=gs://bucket/9s  # paper
"""

from configs import common


def get_config(arg=None):
  return common.get_config(9, arg)
