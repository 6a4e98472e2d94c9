from setuptools import find_packages, setup

setup(
    name="bmask_jax",
    version="0.1.0",
    description="Boundary-preserving Mask R-CNN (ECCV 2020) in JAX/Flax",
    packages=find_packages(include=["bmask_jax", "bmask_jax.*"]),
    python_requires=">=3.10",
    entry_points={"console_scripts": ["bmask-jax = bmask_jax.__main__:main"]},
    install_requires=[
        "jax>=0.10.2",
        "jaxlib>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1.0",
        "numpy>=2.0",
        "pycocotools>=2.0.11",
        "faster-coco-eval>=1.8.0,<2",     # Boundary AP (iouType="boundary")
        "pillow",
        # COCO-format data prepared as a TFDS dataset (array_record); no TensorFlow needed.
        # tfds uses pillow and importlib_resources without declaring them.
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",
        "matplotlib",
        "tqdm",
        "tensorboardX",
        "absl-py",
        "flatbuffers",                     # jax.export serialization (bmask-jax export)
        "cityscapesscripts>=2.2",          # Cityscapes' official instance AP (cityscapes_eval.py)
    ],
    extras_require={
        "torch": ["torch==2.13.0"],          # only to write reference checkpoints in tests
        "video": ["av>=14"],                 # --mode predict on video files (video.py)
        "test": ["pytest", "pytest-xdist>=3.6", "torch==2.13.0", "av>=14", "tensorboard"],
    },
)
