"""medlens: convolutional neural networks for medical imaging, from folders of images to trusted models."""

__version__ = "0.1.0"
