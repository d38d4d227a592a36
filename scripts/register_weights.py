"""Copy a finished run's weights into the package zoo: ``comdefend zoo register`` as a script.

    python scripts/register_weights.py runs/classifier-fashion-cnn --name fashion-cnn \
        --command "comdefend train-classifier ..." --hardware "2-core x86_64 CPU"

is ``comdefend zoo register fashion-cnn --weights runs/classifier-fashion-cnn/model.safetensors
--command ... --hardware ... --replace``, kept for ``scripts/train_zoo.py`` and older notes.
``--weights best`` registers the run's ``best.safetensors``; ``--weights auto`` its final weights,
or the best ones of a collapsed run (``--if-collapsed best``). The logic lives in
:func:`comdefend.zoo.registration.register_weights`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from comdefend.errors import ComDefendError
from comdefend.zoo.registration import register_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--command", required=True, help="the exact command that trained it")
    parser.add_argument("--hardware", required=True)
    parser.add_argument("--notes", default="")
    parser.add_argument(
        "--weights",
        choices=("final", "best", "auto"),
        default="final",
        help="register the run's final model.safetensors (default), its best.safetensors, or "
        "(auto) the final weights unless the run collapsed, then the best ones",
    )
    args = parser.parse_args()
    weights = {"final": "model.safetensors", "best": "best.safetensors", "auto": ""}[args.weights]
    try:
        entry = register_weights(
            args.name,
            args.run / weights if weights else args.run,
            command=args.command,
            hardware=args.hardware,
            notes=args.notes,
            if_collapsed="best" if args.weights == "auto" else "refuse",
            replace=True,  # re-registering a name replaces its entry, as this script always did
        )
    except ComDefendError as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
