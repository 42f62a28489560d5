"""foldernet: folders of labelled examples -> a classifier you can trust and ship.

    import foldernet
    result = foldernet.train("data/", out="runs/x")
    model = foldernet.load("runs/x")
    for p in model.predict(["photo.jpg"], top_k=3):
        print(p.source, p.top)

Importing foldernet does not import torch (each stage imports it where it is needed), so
``foldernet.onnx_predictor`` runs with only onnxruntime, NumPy and Pillow at hand.
"""

__version__ = "0.1.0"

from .bundle import Classifier, Prediction, load  # noqa: E402
from .data import scan  # noqa: E402
from .errors import FoldernetError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .export import export  # noqa: E402
from .split import split_dataset  # noqa: E402
from .train import train  # noqa: E402

__all__ = ["Classifier", "FoldernetError", "Prediction", "__version__", "evaluate", "export", "load", "scan",
           "split_dataset", "train"]
