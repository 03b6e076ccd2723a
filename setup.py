from setuptools import setup

setup(
    name="revtriton",
    version="0.1.0",
    description="Reversible residual networks for PyTorch with fused Triton coupling kernels",
    python_requires=">=3.9",
    # revtriton/kernels is a committed symlink to the top-level kernels/ (the name `kernels` on
    # its own belongs to another PyPI project): the checkout imports as it installs, with or
    # without an install of any kind, and a wheel holds the kernels once, as revtriton/kernels.
    packages=["revtriton", "revtriton.kernels", "revtriton.models"],
    # numpy: Triton's interpreter (TRITON_INTERPRET=1, the CPU path of the tests) needs it
    install_requires=["torch>=2.4", "numpy", "triton>=3.0; platform_system == 'Linux'"],
    # test: wheel builds the wheel that tests/test_install.py installs; matplotlib draws the plot;
    # hypothesis draws the random chains of tests/test_fuzz.py
    extras_require={"test": ["pytest>=7", "wheel", "matplotlib", "hypothesis"], "plot": ["matplotlib"]},
)
