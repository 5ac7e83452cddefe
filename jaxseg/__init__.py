"""jaxseg: semi-supervised 3D medical image segmentation (UNETR + comparative pre-training) in JAX."""

__version__ = "0.1.0"


def load_model(run, dtype=None):
    """``(model, params, preprocessing)`` of a trained run folder; see ``jaxseg.predict.load_model``."""
    from jaxseg.predict import load_model as _load

    return _load(run, dtype)
