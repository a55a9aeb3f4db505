"""netlib: a Caffe-compatible neural network framework in Python."""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = ["lmdb>=1.4", "plyvel>=1.5", "Pillow>=9"]
PLOT = ["matplotlib>=3.5"]
DRAW = ["pydot>=1.4"]
ACCEL = ["numba>=0.59"]
ONNX = ["onnx>=1.14", "onnxruntime>=1.16"]
MPI = ["mpi4py>=3.1", "mpich>=4.1; sys_platform == 'linux'"]

setup(
    name="netlib",
    version="0.1.0",
    description="Caffe-compatible neural networks in Python: prototxt, caffemodel, solvers, pycaffe API",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-2-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["netlib", "netlib.*"]),
    package_data={"netlib": ["data/*", "data/**/*"]},
    include_package_data=True,
    install_requires=["numpy>=1.23", "protobuf>=7.35.1", "h5py>=3.6", "tqdm>=4.60"],
    extras_require={
        # Caffe's databases and images: LMDB, LevelDB, JPEG/PNG decoding.
        "data": DATA,
        # plot_training_log's charts.
        "plot": PLOT,
        # caffe.draw / draw_net graphs (PNG/SVG/PDF also need Graphviz's dot program).
        "draw": DRAW,
        # Compiled kernels for non-GEMM layer work (netlib.accel; wheels, no compiler).
        "accel": ACCEL,
        # The test suite: every optional feature, and OpenCV as the independent
        # reference for netlib's own image decoding and resizing.
        "test": ["pytest>=7", "grpcio-tools>=1.85", "opencv-python-headless>=4.8", "hypothesis>=6.100"] + DATA + PLOT + DRAW + ACCEL + MPI + ONNX,
        # ONNX export of deploy nets (netlib export-onnx, Net.to_onnx); onnxruntime runs the result.
        "onnx": ONNX,
        "gpu": ["cupy-cuda12x"],
        # Data-parallel training under mpirun (netlib.parallel): MPI from wheels, no compiler.
        "mpi": MPI,
    },
    entry_points={"console_scripts": ["netlib=netlib.tools.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
