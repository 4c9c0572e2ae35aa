"""ttt-jax: Test-Time-Training layers for one-minute video diffusion in JAX."""

from setuptools import find_packages, setup

setup(
    name="ttt-jax",
    version="0.1.0",
    description="JAX/Flax reproduction of One-Minute Video Generation with Test-Time Training",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ttt_jax", "ttt_jax.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.11.0",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "chex>=0.1.89",
        "ml-collections>=1.0.0",
        "absl-py>=2.1.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        "grain>=0.2.10",
        "matplotlib>=3.8",
        "imageio>=2.34",
        "imageio-ffmpeg>=0.5",
        "safetensors>=0.4",  # reading pretrained weights (ttt_jax.weights)
        "sentencepiece>=0.2",  # the T5 tokenizer
        # Prepared datasets (ttt_jax.data.dataset): tfds builds and reads array_record
        # without TensorFlow; its path layer needs etils' epath extra.
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5",
        "etils[epath]",
        # tfds imports importlib_resources (the backport) lazily; etils >= 1.15 no longer
        # brings it, so a fresh install lacked it.
        "importlib_resources",
    ],
    extras_require={
        # Parity references, built from tiny configs offline. torch is pinned: the CPU
        # wheel of this version is what the CI machines carry (a plain "torch" pulls CUDA).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "ipython>=8.0", "torch==2.13.0",
                 "diffusers>=0.32", "transformers>=4.46"],
    },
)
