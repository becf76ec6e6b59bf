"""moe_jax: sparse Mixture-of-Experts language models in JAX/Flax."""

import setuptools

setuptools.setup(
    name="moe_jax",
    version="0.1.0",
    description="Sparse Mixture-of-Experts T5 / decoder models and FLAN-style "
    "instruction tuning in JAX and Flax.",
    packages=setuptools.find_packages(include=["moe_jax", "moe_jax.*",
                                               "tasks", "tasks.*"]),
    package_data={"": ["*.gin"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "etils[epath]>=1.5",
        "google-cloud-storage>=2.14",  # orbax on gs:// model directories
        "gin-config>=0.5",
        "numpy>=1.26",
        "seqio>=0.0.20",
        "tensorflow>=2.21",
        "tensorflow-text>=2.21",
        "tensorflow-datasets>=4.9",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tensorboard>=2.16",
    ],
    extras_require={
        # GPU grouped-matmul kernels (grouped_matmul='tokamax'); tokamax
        # needs Python >= 3.12 and jax >= 0.11, so pip skips it on 3.11.
        "tokamax": [
            "tokamax; python_version >= '3.12'",
            "jax>=0.11; python_version >= '3.12'",
        ],
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "hypothesis>=6",
            "scipy>=1.11",
            "matplotlib>=3.8",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            "transformers>=4.40",
            "torch>=2.2",
        ],
    },
)
