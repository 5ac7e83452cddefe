"""jaxseg: semi-supervised 3D medical image segmentation (UNETR + comparative pre-training) in JAX."""

__version__ = "0.1.0"
