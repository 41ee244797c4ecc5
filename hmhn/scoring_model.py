"""The registered HMHN scoring model, in MLflow's models-from-code form.

hmhn.serving.log_scoring_model logs THIS FILE as the model (``mlflow.pyfunc.log_model(
python_model="<this file>", artifacts={weights, configs}, code_paths=[hmhn, pipeline])``):
MLflow copies it into the model folder and, whenever the model is loaded (``mlflow.pyfunc.
load_model``, ``mlflow models serve``), runs it to obtain the model object. Nothing is pickled:
the model is this code plus the artifacts it reads in ``HMHNPyfuncModel.load_context`` -
``weights.pt`` (a state_dict loaded with ``torch.load(weights_only=True)``), ``hmhn_config.json``
and ``preprocess_config.json``.

Keep this file tiny and free of side effects other than ``set_model``: it runs at logging time
in the training driver and at every load.
"""
import mlflow

from hmhn.serving import HMHNPyfuncModel

mlflow.models.set_model(HMHNPyfuncModel())
