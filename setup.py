from setuptools import find_packages, setup

setup(
    name="llava_ft",
    version="0.1.0",
    description="Build and fine-tune LLaVA-style vision-language models on modest hardware.",
    packages=find_packages(include=["llava_ft", "llava_ft.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "transformers>=5.0",
        "peft",
        "accelerate",
        "datasets",
        "safetensors",
        "sentencepiece",
        "protobuf",
        "tokenizers",
        "pillow",
        "open_clip_torch",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "gpu": ["liger-kernel", "bitsandbytes"],
        "4bit": ["bitsandbytes"],
        "deepspeed": ["deepspeed"],
    },
    entry_points={"console_scripts": ["llava-ft=llava_ft.cli.main:main"]},
)
