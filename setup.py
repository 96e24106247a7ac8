from setuptools import find_packages, setup

setup(
    name="grpo-trainer",
    version="0.1.0",
    description="A from-scratch GRPO trainer in pure PyTorch.",
    license_expression="Apache-2.0",
    license_files=["LICENSE"],
    # The kernels/ folder installs as grpo_kernels: a top-level `kernels` is Hugging Face's (transformers
    # imports it), and with no kernels/__init__.py the folder never shadows it, even from the repository root.
    packages=find_packages(include=["grpo", "grpo.*"]) + ["grpo_kernels"],
    package_dir={"grpo_kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",  # 2.8 for FSDP (docs/requirements.md)
        "transformers>=4.56.2",
        "accelerate>=1.0",  # transformers needs it to read GGUF files (the embedded model)
        "datasets>=2.19",
        "safetensors>=0.4.3",
        "tensorboard>=2.14",
        "jinja2>=3.1",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "numpy>=1.24",
        "gguf>=0.11",
    ],
    extras_require={
        "wandb": ["wandb>=0.17"],
        # triton: its interpreter runs the Triton log-prob kernels on CPU tensors in the tests
        "test": [
            "pytest>=8",
            "ruff>=0.5",
            "peft>=0.13",
            "wandb>=0.17",
            "triton>=3.4; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
        "unsloth": ["unsloth"],
        # rollout_engine: vllm on a GPU; the CPU build is installed by hand (docs/vllm.md)
        "vllm": ["vllm>=0.32"],
        "bench": ["trl>=1.16"],
    },
    entry_points={"console_scripts": ["grpo=grpo.jobs.cli:main"]},
)
