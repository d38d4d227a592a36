"""Bridges to the adversarial-robustness tools users already have.

* :mod:`comdefend.interop.art`: any comdefend defense as a preprocessor of an ART
  (Adversarial Robustness Toolbox) PyTorch estimator, with BPDA in its backward pass, so ART's
  attacks can be run against it (``pip install "comdefend[interop]"``); the estimator's model
  keeps the zero-gradient check of comdefend's attacks (:func:`guard_zero_gradient`).
* torchattacks, foolbox or your own attacks enter :func:`comdefend.attacks.make_attack` and
  ``comdefend evaluate --attack NAME`` through :func:`comdefend.attacks.adapt_attack` and
  :func:`comdefend.attacks.register_attack`.
"""

from comdefend.interop.art import art_classifier, art_preprocessor, guard_zero_gradient

__all__ = ["art_classifier", "art_preprocessor", "guard_zero_gradient"]
