"""Curriculum stage: 30-second videos.

    python -m ttt_jax.train --config=configs/tom_jerry_30s.py:tiny --workdir=workdirs/30s
    python -m ttt_jax.train --config=configs/tom_jerry_30s.py --workdir=gs://bucket/30s  # paper
"""

from configs import common


def get_config(arg=None):
  return common.get_config(30, arg)
