from setuptools import setup

setup(
    name="minidiff",
    version="0.1.0",
    description="Small, readable text-to-image diffusion in plain PyTorch: SD 1.x/2.x, SDXL, LCM, Wuerstchen.",
    python_requires=">=3.10",
    # kernels/ and weights/ live at the top of the repo but install as minidiff.kernels / minidiff.weights.
    packages=["minidiff", "minidiff.assets", "minidiff.models", "minidiff.schedulers", "minidiff.pipelines", "minidiff.toy", "minidiff.distill", "minidiff.weights", "minidiff.kernels"],
    package_dir={"minidiff": "minidiff", "minidiff.weights": "weights", "minidiff.kernels": "kernels"},
    include_package_data=True,
    package_data={"minidiff.assets": ["*/*", "*/*/*"], "minidiff.kernels": ["*.cpp"]},  # the CPU attention kernel's source (built at first use)
    install_requires=["torch>=2.1", "safetensors", "huggingface_hub", "tokenizers", "numpy", "pillow"],
    extras_require={
        "test": ["pytest", "diffusers==0.39.0", "transformers==4.57.6", "peft", "accelerate", "scikit-image",
                 "compel==2.1.1", "pyparsing", "torchsde", "torchdiffeq", "scipy", "triton", "ninja", "setuptools"],  # torchsde..scipy: what k_diffusion.sampling imports (k-diffusion is installed --no-deps by .ci/run)
        "triton": ["triton"],
        "cpu-kernels": ["ninja", "setuptools"],  # kernels.use("cpu") builds its C++ with torch.utils.cpp_extension (and a C++ compiler)
    },
    entry_points={"console_scripts": ["minidiff=minidiff.cli:main"]},
)
