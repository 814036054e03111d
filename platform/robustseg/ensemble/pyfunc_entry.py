"""MLflow models-from-code entry: the pyfunc model is built here at load time, never unpickled."""
import mlflow

from robustseg.ensemble.pyfunc import EnsemblePyfunc

mlflow.models.set_model(EnsemblePyfunc())
