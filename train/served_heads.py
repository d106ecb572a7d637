"""A fine-tuned model's code, logged as an MLflow "model from code" (nothing is pickled).

    pipeline.core.registry.load_model("models:/gpt2-pipeline-finetuned@best").predict(["a text", ...])

returns, per text, {head name: class index (classification), number (regression) or a class per token
(token classification)}. Load it with pipeline.core.registry.load_model, which checks every file of the
version (this one included) against the sha256 the registry recorded before MLflow runs any of them; plain
mlflow.pyfunc.load_model runs this file unchecked, and load_context then checks the weights and config
only. MLflow runs this file when it loads the model; the pipeline never imports it.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class TaskPredictor(PythonModel):
    def load_context(self, context) -> None:
        from pipeline.core.model.heads import load_hf
        from pipeline.core.registry import verify_loaded

        verify_loaded(context.artifacts["checkpoint"])  # weights and config as registered, or refuse
        self.model = load_hf(context.artifacts["checkpoint"]).eval()

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[dict]:
        import torch

        from tokenization.tokenizer import encoding

        enc, out = encoding(), []
        block = self.model.config.block_size
        for text in model_input:
            idx = torch.tensor([enc.encode_ordinary(text)[:block]])
            with torch.no_grad():
                logits, _ = self.model(idx)
            row = {}
            for name, spec in self.model.specs.items():
                value = logits[name][0]
                row[name] = (value.item() if spec.kind == "regression" else value.argmax(-1).tolist())
            out.append(row)
        return out


mlflow.models.set_model(TaskPredictor())
