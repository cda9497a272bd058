"""gradprobe: gradient-based reliability (uncertainty, explanations) for deployed image classifiers."""
from setuptools import setup

EXPORT = ["torch>=2.4", "onnx>=1.17", "onnxscript>=0.3", "safetensors>=0.4"]
CPU = ["onnxruntime>=1.20"]
KERNELS = ["cuda-python>=12", "nvidia-cuda-nvrtc>=12"]  # compiles the CUDA kernels, even without a GPU
# TensorRT engines (gradprobe build; onnx for the --fp16 graph rewrite), ONNX Runtime's CUDA provider, the kernels.
# Not with [cpu]: onnxruntime and onnxruntime-gpu install the same module.
GPU = ["onnxruntime-gpu>=1.20", "tensorrt>=10.0", "onnx>=1.17"] + KERNELS
LINT = ["polygraphy>=0.49", "onnx-graphsurgeon>=0.5", "onnx>=1.17"]  # NVIDIA's ONNX checks, no GPU needed
VIZ = ["matplotlib>=3.7"]
SERVE = ["nvidia-pytriton>=0.7", "tritonclient[grpc,http]>=2.50"]  # Triton Inference Server + clients
SCALE = ["ray[data]>=2.50", "pyarrow>=17", "pillow>=10"]  # batch scoring on Ray Data, Parquet out
TEST = ["pytest>=8", "pytest-benchmark>=4", "pytest-timeout>=2.1", "hypothesis>=6.100", "scikit-learn>=1.3"] + VIZ

setup(
    name="gradprobe",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["gradprobe", "gradprobe.base", "gradprobe.data", "gradprobe.detect", "gradprobe.serve", "gradprobe.export",
              "gradprobe.runtime", "gradprobe.kernels"],
    package_dir={"gradprobe": "sdk", "gradprobe.export": "export",
                 "gradprobe.runtime": "runtime", "gradprobe.kernels": "kernels"},
    package_data={"gradprobe": ["pretrained/*.safetensors"], "gradprobe.kernels": ["cuda/*.cu"]},
    install_requires=["numpy>=1.24", "tqdm>=4.60", "threadpoolctl>=3", "filelock>=3.12"],
    extras_require={
        "export": EXPORT,
        "cpu": CPU,
        "gpu": GPU,
        "kernels": KERNELS,
        "lint": LINT,
        "viz": VIZ,
        "serve": SERVE,
        "scale": SCALE,
        "test": TEST,
        "dev": EXPORT + CPU + TEST + KERNELS + LINT,
    },
    entry_points={"console_scripts": ["gradprobe = gradprobe.cli:main"]},
)
