"""Curriculum stage: 63-second videos.

    python -m ttt_jax.train --config=configs/tom_jerry_63s.py:tiny --workdir=workdirs/63s
    python -m ttt_jax.train --config=configs/tom_jerry_63s.py --workdir=gs://bucket/63s  # paper
"""

from configs import common


def get_config(arg=None):
  return common.get_config(63, arg)
