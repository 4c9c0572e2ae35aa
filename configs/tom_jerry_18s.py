"""Curriculum stage: 18-second videos.

    python -m ttt_jax.train --config=configs/tom_jerry_18s.py:tiny --workdir=workdirs/18s
    python -m ttt_jax.train --config=configs/tom_jerry_18s.py --workdir=gs://bucket/18s  # paper
"""

from configs import common


def get_config(arg=None):
  return common.get_config(18, arg)
