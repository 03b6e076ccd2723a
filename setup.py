from setuptools import setup

setup(
    name="revtriton",
    version="0.1.0",
    description="Reversible residual networks for PyTorch with fused Triton coupling kernels",
    python_requires=">=3.9",
    packages=["revtriton", "revtriton.kernels", "revtriton.models"],
    # kernels/ sits at the top of the repository but installs as revtriton.kernels: the name
    # `kernels` on its own belongs to another PyPI project.
    package_dir={"revtriton": "revtriton", "revtriton.kernels": "kernels"},
    install_requires=["torch>=2.4", "triton>=3.0; platform_system == 'Linux'"],
    extras_require={"test": ["pytest>=7"], "plot": ["matplotlib"]},
)
