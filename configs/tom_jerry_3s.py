"""Curriculum stage: 3-second videos.

    python -m ttt_jax.train --config=configs/tom_jerry_3s.py:tiny --workdir=workdirs/3s
    python -m ttt_jax.train --config=configs/tom_jerry_3s.py --workdir=gs://bucket/3s  # paper
"""

from configs import common


def get_config(arg=None):
  return common.get_config(3, arg)
