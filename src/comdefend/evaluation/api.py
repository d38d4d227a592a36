"""The Python entry point of an evaluation: :func:`evaluate` with keyword arguments.

Every argument has the meaning of the :class:`~comdefend.evaluation.config.EvaluationConfig`
field of the same name and the same default (and of the ``comdefend evaluate`` option); the
classifier and the defenses may also be ``nn.Module`` objects.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from comdefend.errors import UsageError
from comdefend.evaluation.config import EvaluationConfig
from comdefend.evaluation.inputs import class_path, defense_label
from comdefend.evaluation.results import EvaluationResult


def _unique(label: str, taken: set[str]) -> str:
    if label not in taken:
        return label
    number = 2
    while f"{label}#{number}" in taken:
        number += 1
    return f"{label}#{number}"


def _defense_specs(
    defenses: Sequence[nn.Module | str],
) -> tuple[list[str], dict[str, nn.Module]]:
    """The run's defense names, and the modules among them by name (a module gets its
    :func:`~comdefend.evaluation.inputs.defense_label`, numbered ``#2``, ... when taken)."""
    if isinstance(defenses, (str, nn.Module)):
        defenses = [defenses]
    specs: list[str] = []
    modules: dict[str, nn.Module] = {}
    taken = {d.strip() for d in defenses if isinstance(d, str)}
    for defense in defenses:
        if isinstance(defense, str):
            specs.append(defense)
        elif isinstance(defense, nn.Module):
            label = _unique(defense_label(defense), taken | set(modules))
            modules[label] = defense
            specs.append(label)
        else:
            raise UsageError(
                f"a defense is a spec string (e.g. jpeg:75) or a torch.nn.Module, got a "
                f"{type(defense).__name__}"
            )
    return specs, modules


@contextmanager
def _state_restored(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Give the caller's modules back in the mode and with the ``requires_grad`` flags they
    came in (the evaluation puts them in eval mode and freezes them)."""
    modes = [[(m, m.training) for m in module.modules()] for module in modules]
    flags = [[(p, p.requires_grad) for p in module.parameters()] for module in modules]
    try:
        yield
    finally:
        for pairs in modes:
            for submodule, training in pairs:
                submodule.training = training
        for parameters in flags:
            for parameter, requires_grad in parameters:
                parameter.requires_grad_(requires_grad)


def evaluate(
    classifier: nn.Module | str | os.PathLike[str],
    dataset: str,
    *,
    defenses: Sequence[nn.Module | str] = ("none",),
    attacks: Sequence[str] = ("fgsm", "pgd"),
    threat_models: Sequence[str] = ("oblivious",),
    eps: Sequence[float] = (2.0, 4.0, 8.0, 16.0),
    n: int = 1000,
    split: str = "test",
    attack_params: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    batch_size: int = 100,
    device: str = "cpu",
    data_dir: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    out: str | os.PathLike[str] | None = None,
    force: bool = False,
    resume: bool = False,
    eot_samples: int = 8,
    eot_draws: int = 3,
    detectors: Sequence[str] = (),
    detector_holdout: int = 1000,
    precision: str | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Robust accuracy of ``classifier`` behind each defense, under attacks and threat models.

    The classifier may be your own model: any ``nn.Module`` that takes NCHW float images in
    [0, 1] (normalization inside the model) and returns ``(N, classes)`` logits. The contract is
    checked on the first images of the dataset before any attack runs; a model that breaks it
    stops the run with a one-line :class:`~comdefend.errors.UsageError`. The model is put in eval
    mode on ``device`` for the run (its training mode and ``requires_grad`` flags are given back
    afterwards); the results record its class and the sha256 of its ``state_dict``.

    Args:
        classifier: an ``nn.Module``; a classifier checkpoint path or zoo name
            (``fashion-cnn``, ``resnet20-cifar10``); or ``"package.module:factory"``, a callable
            without required arguments that returns the ``nn.Module``.
        dataset: ``fashion-mnist``, ``cifar10``, ``cifar100`` or ``imagenet``.
        defenses: spec strings (``none``, ``jpeg:75``, ``bits:3+median:2``,
            ``comdefend:zoo:comdefend-cifar10``; :func:`comdefend.defenses.parse_defense`) or
            ``nn.Module`` purifiers (images in, images of the same shape out; a module's
            ``differentiable = False`` makes the attacker use BPDA, ``randomized = True`` EOT).
            A module's cells are named by its ``name`` attribute, else its class name.
        attacks: attack names (``fgsm``, ``bim``, ``pgd``, ``mifgsm``, ``deepfool``, ``cw``,
            ``apgd-ce``, ``apgd-dlr``; :data:`comdefend.attacks.ATTACKS`).
        threat_models: ``oblivious``, ``bpda``, ``bpda+eot``, ``relaxed``.
        eps: L-inf budgets in units of 1/255 (8 means 8/255).
        n: evaluate the first ``n`` images.
        split: ``test``, or ``sample``: the 1,000 class-balanced test images embedded in the
            package (Fashion-MNIST and CIFAR-10; no download).
        attack_params: extra hyper-parameters per attack, e.g. ``{"pgd": {"steps": 20}}``.
        seed: master seed of every random choice.
        batch_size: images per attack and forward call.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        data_dir: the dataset's folder (default: ``$COMDEFEND_DATA`` or the usual places).
        image_size: center crop of ImageNet images (default 224).
        out: write ``results.json``, ``results.csv``, ``report.md`` and ``report.html`` there.
        force, resume: overwrite ``out``, or continue the interrupted run in it.
        eot_samples: the attacker's EOT draws under ``bpda+eot``.
        eot_draws: evaluation draws of randomized defenses.
        detectors: ``pca``, ``squeeze``; ``detector_holdout``: clean images calibrating them.
        precision: ``fp32``, ``tf32`` or ``bf16`` for every ComDefend defense.
        progress: show a progress bar.

    Returns:
        The typed, serialisable result: ``result.cell(attack, eps, defense, threat_model)``,
        ``result.cells``, ``result.clean``, ``result.worst_case``, ``result.to_dict()``,
        ``result.save("results.json")``.

    Raises:
        UsageError: a bad argument, a factory that cannot be imported or called, a classifier
            or defense that breaks the contract (each a one-line message).
        CheckpointError, DatasetNotFoundError: an unreadable checkpoint, a missing dataset.

    Example:
        Your own PyTorch classifier behind ComDefend, on the 1,000 Fashion-MNIST test images
        that ship with the package (no download; an untrained model here, so expect chance
        accuracy)::

            import torch
            from torch import nn
            from comdefend.evaluation import evaluate

            class MyClassifier(nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))

                def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 28, 28) in [0, 1]
                    return self.net((x - 0.286) / 0.353)  # (N, 10) logits

            result = evaluate(
                MyClassifier(),
                "fashion-mnist",
                split="sample",
                defenses=["none", "jpeg:75", "comdefend:zoo:comdefend-fashion-mnist"],
                attacks=["fgsm", "pgd"],
                threat_models=["oblivious", "bpda"],
                eps=[8],
                n=100,
                attack_params={"pgd": {"steps": 10}},
            )
            print(result.cell("pgd", 8, "comdefend:zoo:comdefend-fashion-mnist", "bpda"))
            result.save("results.json")

        The same from the command line, with the model built by ``mypackage/models.py``'s
        ``build()``::

            comdefend evaluate --classifier mypackage.models:build --dataset fashion-mnist \\
                --split sample --defense none --defense jpeg:75 --attack fgsm,pgd --eps 8 \\
                --images 100 --out reports/mine
    """
    from comdefend.evaluation.harness import evaluate as run

    module: nn.Module | None = None
    if isinstance(classifier, nn.Module):
        module, reference = classifier, class_path(classifier)
    elif isinstance(classifier, (str, os.PathLike)):
        reference = os.fspath(classifier)
    else:
        raise UsageError(
            "classifier must be a torch.nn.Module, a checkpoint path, a zoo name or "
            f"package.module:factory, got a {type(classifier).__name__}"
        )
    specs, modules = _defense_specs(defenses)
    config = EvaluationConfig(
        dataset=dataset,
        classifier=reference,
        split=split,
        defenses=specs,
        attacks=[attacks] if isinstance(attacks, str) else list(attacks),
        eps=[eps] if isinstance(eps, (int, float)) else list(eps),
        threat_models=[threat_models] if isinstance(threat_models, str) else list(threat_models),
        n=n,
        seed=seed,
        batch_size=batch_size,
        data_dir=os.fspath(data_dir) if data_dir is not None else None,
        out=os.fspath(out) if out is not None else None,
        force=force,
        resume=resume,
        eot_samples=eot_samples,
        eot_draws=eot_draws,
        detectors=[detectors] if isinstance(detectors, str) else list(detectors),
        detector_holdout=detector_holdout,
        attack_params={k: dict(v) for k, v in (attack_params or {}).items()},
        device=device,
        progress=progress,
        precision=precision,
        image_size=image_size,
    )
    given = [m for m in (module, *modules.values()) if m is not None]
    with _state_restored(given):
        return run(config, classifier=module, defense_modules=modules)


__all__ = ["evaluate"]
